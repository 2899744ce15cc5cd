/*
 * client.c -- dvs's side of the guardian (see hv.h): starting it, one request round trip,
 * and serving trapped MMIO accesses from a byte bank.
 *
 * Semantics relied on:
 *  - fork() in a multi-threaded process copies only the calling thread; the child runs C only
 *    (dvs_hv_guardian_main never returns) and uses raw syscalls. All signals are blocked across
 *    the fork so no Python-level handler can run in the child before it resets them.
 *  - SOCK_SEQPACKET keeps message boundaries and reports EOF when the peer's last copy of its
 *    end is closed; both ends here are close-on-exec, so programs dvs later starts do not
 *    keep the guardian from noticing that dvs died.
 *  - cffi releases the GIL around these calls; a signal for Python (SIGINT) interrupts poll()
 *    with EINTR, and we finish the round trip so that the protocol never desynchronises:
 *    Python raises KeyboardInterrupt right after the call returns.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "compat.h"
#include "ptrace/guardian.h"
#include "ptrace/hv.h"

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Receive one message, waiting at most until deadline_ms (monotonic). */
static ssize_t recv_until(int fd, void *buf, size_t len, int64_t deadline_ms)
{
	for (;;) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		int64_t left = deadline_ms - now_ms();
		ssize_t n;
		int r;

		if (left < 0)
			return -ETIMEDOUT;
		r = poll(&p, 1, (int)(left > 1000000 ? 1000000 : left));
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -errno;
		if (r == 0)
			continue;
		n = recv(fd, buf, len, MSG_DONTWAIT);
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EPIPE;
		return n;
	}
}

int dvs_hv_start(struct dvs_hv_start *req)
{
	int control[2], mmio[2];
	sigset_t all, old;
	struct dvs_hv_guardian_args args;
	struct dvs_hv_response *resp;
	pid_t child;
	ssize_t n;
	int err;

	req->guardian_pid = req->guardian_pidfd = req->control_fd = req->mmio_fd = -1;
	req->message[0] = '\0';
	if (req->pid <= 0 || (req->scratch_size < 16384 && !(req->flags & DVS_HV_START_SKIP_SCRATCH)))
		return -EINVAL;
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, control) < 0)
		return -errno;
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, mmio) < 0) {
		err = -errno;
		close(control[0]);
		close(control[1]);
		return err;
	}
	args.pid = req->pid;
	args.control_fd = control[1];
	args.mmio_fd = mmio[1];
	args.log_fd = req->debug_fd;
	args.syscall_insn = req->syscall_insn;
	args.scratch_size = req->scratch_size;
	args.attach_timeout_ms = req->attach_timeout_ms ? req->attach_timeout_ms : 10000;
	args.flags = req->flags;
	args.shared_bank = NULL;
	args.shared_bank_size = 0;
	req->shared_bank = 0;
	if (req->shared_bank_size) {
		void *bank = mmap(NULL, req->shared_bank_size, PROT_READ | PROT_WRITE,
				  MAP_SHARED | MAP_ANONYMOUS, -1, 0);

		if (bank == MAP_FAILED) {
			err = -errno;
			close(control[0]);
			close(control[1]);
			close(mmio[0]);
			close(mmio[1]);
			return err;
		}
		args.shared_bank = bank;
		args.shared_bank_size = req->shared_bank_size;
	}

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	child = fork();
	if (child == 0)
		dvs_hv_guardian_main(&args);
	err = child < 0 ? -errno : 0;
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	close(control[1]);
	close(mmio[1]);
	if (err) {
		close(control[0]);
		close(mmio[0]);
		if (args.shared_bank)
			munmap(args.shared_bank, args.shared_bank_size);
		return err;
	}
	req->shared_bank = (uint64_t)(uintptr_t)args.shared_bank;
	req->guardian_pid = child;
	req->guardian_pidfd = (int)syscall(__NR_pidfd_open, child, 0);
	req->control_fd = control[0];
	req->mmio_fd = mmio[0];

	resp = calloc(1, sizeof(*resp));
	if (!resp) {
		err = -ENOMEM;
		goto failed;
	}
	n = recv_until(control[0], resp, sizeof(*resp),
		       now_ms() + (int64_t)args.attach_timeout_ms + 5000);
	if (n < 0) {
		err = (int)n;
		snprintf(req->message, sizeof(req->message), "the guardian %s before attaching",
			 n == -EPIPE ? "exited" : "did not answer");
		goto failed;
	}
	if ((size_t)n < offsetof(struct dvs_hv_response, data)) {
		err = -EPROTO;
		snprintf(req->message, sizeof(req->message), "short attach reply");
		goto failed;
	}
	if (resp->error) {
		err = resp->error;
		memcpy(req->message, resp->message, sizeof(req->message));
		req->message[sizeof(req->message) - 1] = '\0';
		goto failed;
	}
	if (resp->out_len >= sizeof(struct dvs_hv_status)) {
		const struct dvs_hv_status *st = (const void *)resp->data;

		req->injection_tid = st->injection_tid;
		req->n_threads = st->n_threads;
	}
	req->scratch_address = (uint64_t)resp->result;
	free(resp);
	return 0;

failed:
	free(resp);
	/* Closing our end makes a live guardian restore and leave; then reap it. */
	close(req->control_fd);
	close(req->mmio_fd);
	if (req->guardian_pidfd >= 0)
		close(req->guardian_pidfd);
	waitpid(child, NULL, 0);
	if (args.shared_bank)
		munmap(args.shared_bank, args.shared_bank_size);
	req->shared_bank = 0;
	req->guardian_pid = req->guardian_pidfd = req->control_fd = req->mmio_fd = -1;
	return err;
}

int dvs_hv_unmap_bank(uint64_t address, uint32_t size)
{
	if (!address || !size)
		return 0;
	return munmap((void *)(uintptr_t)address, size) < 0 ? -errno : 0;
}

int dvs_hv_call(int control_fd, const struct dvs_hv_request *req, struct dvs_hv_response *resp,
		int32_t timeout_ms)
{
	size_t len = offsetof(struct dvs_hv_request, data) + req->in_len;
	int64_t deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : 30000);

	if (req->in_len > DVS_HV_DATA_MAX)
		return -EINVAL;
	for (;;) {
		ssize_t n = send(control_fd, req, len, MSG_NOSIGNAL);

		if (n >= 0)
			break;
		if (errno == EINTR)
			continue;
		return errno == ECONNRESET ? -EPIPE : -errno;
	}
	for (;;) {
		ssize_t n = recv_until(control_fd, resp, sizeof(*resp), deadline);

		if (n < 0)
			return (int)n;
		if ((size_t)n < offsetof(struct dvs_hv_response, data) ||
		    (size_t)n < offsetof(struct dvs_hv_response, data) + resp->out_len)
			return -EPROTO;
		if (resp->seq == req->seq)
			return 0;
		/* a late answer to an earlier request: skip it */
	}
}

int dvs_hv_mmio_serve(int mmio_fd, int stop_fd, struct dvs_mmio_bank *bank)
{
	struct pollfd p[2] = {
		{.fd = mmio_fd, .events = POLLIN},
		{.fd = stop_fd, .events = POLLIN},
	};

	for (;;) {
		struct dvs_hv_mmio_msg m;
		uint64_t offset;
		int inside;
		ssize_t n;

		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (p[1].revents)
			return 0;
		if (!(p[0].revents & POLLIN)) {
			if (p[0].revents & (POLLHUP | POLLERR))
				return 0;
			continue;
		}
		n = recv(mmio_fd, &m, sizeof(m), MSG_DONTWAIT);
		if (n == 0)
			return 0;
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			return -errno;
		}
		if (n != sizeof(m) || m.len == 0 || m.len > 8) {
			bank->outside++;
			continue;
		}
		offset = m.gpa - bank->base;
		inside = m.gpa >= bank->base && offset < bank->size && m.len <= bank->size - offset;
		if (m.is_write) {
			bank->writes++;
			bank->last_write_gpa = m.gpa;
			bank->last_write_data = m.data;
			if (inside)
				memcpy(bank->bytes + offset, &m.data, m.len);
			else
				bank->outside++;
			continue;
		}
		bank->reads++;
		m.data = ~0ull;
		if (inside) {
			m.data = 0;
			memcpy(&m.data, bank->bytes + offset, m.len);
		} else {
			bank->outside++;
		}
		if (send(mmio_fd, &m, sizeof(m), MSG_NOSIGNAL) < 0 && errno != EAGAIN)
			return 0; /* the guardian is gone */
	}
}
