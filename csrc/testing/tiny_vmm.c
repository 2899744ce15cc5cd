/*
 * tiny_vmm.c -- a minimal KVM hypervisor for the tests: one VM, one vCPU, 64 KiB of RAM and a
 * 16-bit real-mode loop, driven by a plain KVM_RUN loop on the main thread. It exists to show
 * that dvs's hypervisor mechanics depend on nothing QEMU does (threads, memory layout, slot
 * numbering, signal handling) -- and it is the guest of the MMIO round-trip benchmark.
 *
 * Semantics relied on (Documentation/virt/kvm/api.rst):
 *  - KVM_CREATE_VM, KVM_SET_USER_MEMORY_REGION (slot 0: GPA 0..64 KiB), KVM_CREATE_VCPU,
 *    mmap of the vCPU fd (kvm_run, KVM_GET_VCPU_MMAP_SIZE bytes), KVM_SET_SREGS/REGS, then
 *    KVM_RUN until an exit the VMM must handle. A guest access to a GPA without a memory slot
 *    exits with KVM_EXIT_MMIO; for a read the VMM fills kvm_run.mmio.data, and KVM completes
 *    the instruction on the next KVM_RUN. KVM_RUN returns -EINTR when a signal is pending; the
 *    VMM enters again (after the handler ran).
 *  - Real mode: linear address = segment * 16 + offset; the vCPU starts at CS:IP = 0:0x1000.
 *
 * Guest memory map (GPA):
 *   0x0500 u32 last value read from the MMIO window      0x0508 u32 last value read at 0x30000
 *   0x0510 u32 loop iterations                           0x0518 u8  read 0x30000 each loop? (1)
 *   0x0520 u32 0x600DF00D once the divert entry ran      0x0524 u32 times it ran
 *   0x1000 the loop; 0x1100 the divert entry (set IP there: it marks 0x520 and loops on)
 *   0x20000 MMIO window (no slot): the VMM answers reads with 0x5A5A5A5A
 *   0x30000 no slot either (reads answered 0x5A5A5A5A) until someone adds one
 *
 * Output on stdout, one line each: "TINY-VMM READY pid=P ram=0xHVA" once running,
 * "TINY-VMM SIGUSR1 n=N" from the SIGUSR1 handler, "TINY-VMM exit ..." on a fatal exit.
 * Usage: tiny_vmm [--read-slot]   (sets the byte at 0x518)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define RAM_SIZE 0x10000
#define CODE_GPA 0x1000
#define DIVERT_GPA 0x1100
#define ANSWER 0x5A5A5A5Au

/* The loop at 0x1000 (16-bit code). */
static const uint8_t loop_code[] = {
	0x31, 0xC0,                         /* 1000 xor ax, ax                                  */
	0x8E, 0xC0,                         /* 1002 mov es, ax                                  */
	0xB8, 0x00, 0x20,                   /* 1004 mov ax, 0x2000                              */
	0x8E, 0xD8,                         /* 1007 mov ds, ax       ; ds:0 = GPA 0x20000       */
	0xB8, 0x00, 0x30,                   /* 1009 mov ax, 0x3000                              */
	0x8E, 0xE0,                         /* 100C mov fs, ax       ; fs:0 = GPA 0x30000       */
	0x66, 0xA1, 0x00, 0x00,             /* 100E mov eax, [0]     ; MMIO read: an exit       */
	0x26, 0x66, 0xA3, 0x00, 0x05,       /* 1012 mov [es:0x500], eax                         */
	0x26, 0x80, 0x3E, 0x18, 0x05, 0x00, /* 1017 cmp byte [es:0x518], 0                      */
	0x74, 0x0A,                         /* 101D je 1029                                     */
	0x64, 0x66, 0xA1, 0x00, 0x00,       /* 101F mov eax, [fs:0]                             */
	0x26, 0x66, 0xA3, 0x08, 0x05,       /* 1024 mov [es:0x508], eax                         */
	0x26, 0x66, 0xFF, 0x06, 0x10, 0x05, /* 1029 inc dword [es:0x510]                        */
	0xEB, 0xDD,                         /* 102F jmp 100E                                    */
};

/* The divert entry at 0x1100. */
static const uint8_t divert_code[] = {
	0x26, 0x66, 0xC7, 0x06, 0x20, 0x05, 0x0D, 0xF0, 0x0D, 0x60, /* 1100 mov dword [es:0x520],
								        0x600DF00D */
	0x26, 0x66, 0xFF, 0x06, 0x24, 0x05, /* 110A inc dword [es:0x524]                        */
	0xE9, 0xFB, 0xFE,                   /* 1110 jmp 100E                                    */
};

static volatile sig_atomic_t usr1_count;

static void on_usr1(int sig)
{
	char line[64];
	int n;

	(void)sig;
	usr1_count++;
	n = snprintf(line, sizeof(line), "TINY-VMM SIGUSR1 n=%d\n", (int)usr1_count);
	if (write(STDOUT_FILENO, line, (size_t)n) < 0) {
		/* nothing to do */
	}
}

static int die(const char *what)
{
	fprintf(stdout, "TINY-VMM exit %s: %s\n", what, strerror(errno));
	fflush(stdout);
	return 1;
}

static void real_mode_segment(struct kvm_segment *seg, uint16_t selector)
{
	seg->selector = selector;
	seg->base = (uint64_t)selector << 4;
	seg->limit = 0xFFFF;
}

int main(int argc, char **argv)
{
	struct kvm_userspace_memory_region region;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct kvm_run *run;
	struct sigaction sa;
	uint8_t *ram;
	int kvm, vm, vcpu, run_size;

	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		return die("open /dev/kvm");
	if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
		return die("KVM API version");
	vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		return die("KVM_CREATE_VM");
	/* Intel without unrestricted guest needs a TSS area for real mode; harmless elsewhere */
	ioctl(vm, KVM_SET_TSS_ADDR, 0xFFFBD000ul);

	ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (ram == MAP_FAILED)
		return die("mmap RAM");
	memcpy(ram + CODE_GPA, loop_code, sizeof(loop_code));
	memcpy(ram + DIVERT_GPA, divert_code, sizeof(divert_code));
	ram[0x518] = argc > 1 && strcmp(argv[1], "--read-slot") == 0;
	memset(&region, 0, sizeof(region));
	region.slot = 0;
	region.guest_phys_addr = 0;
	region.memory_size = RAM_SIZE;
	region.userspace_addr = (uint64_t)(uintptr_t)ram;
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		return die("KVM_SET_USER_MEMORY_REGION");

	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		return die("KVM_CREATE_VCPU");
	run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size < (int)sizeof(*run))
		return die("KVM_GET_VCPU_MMAP_SIZE");
	run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		return die("mmap kvm_run");

	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		return die("KVM_GET_SREGS");
	real_mode_segment(&sregs.cs, 0);
	real_mode_segment(&sregs.ds, 0);
	real_mode_segment(&sregs.es, 0);
	real_mode_segment(&sregs.fs, 0);
	real_mode_segment(&sregs.gs, 0);
	real_mode_segment(&sregs.ss, 0);
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		return die("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA;
	regs.rsp = 0x8000;
	regs.rflags = 0x2;
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		return die("KVM_SET_REGS");

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);

	printf("TINY-VMM READY pid=%d ram=%#lx\n", (int)getpid(), (unsigned long)(uintptr_t)ram);
	fflush(stdout);

	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return die("KVM_RUN");
		}
		switch (run->exit_reason) {
		case KVM_EXIT_MMIO:
			if (!run->mmio.is_write) {
				uint32_t answer = ANSWER;
				uint32_t len = run->mmio.len > 8 ? 8 : run->mmio.len;

				memset(run->mmio.data, 0x5A, sizeof(run->mmio.data));
				memcpy(run->mmio.data, &answer, len < 4 ? len : 4);
			}
			break;
		case KVM_EXIT_IO:
		case KVM_EXIT_INTR:
			break;
		case KVM_EXIT_HLT:
			printf("TINY-VMM exit hlt\n");
			fflush(stdout);
			return 0;
		default:
			printf("TINY-VMM exit reason %u (hardware %llu, suberror %u)\n",
			       run->exit_reason,
			       (unsigned long long)run->fail_entry.hardware_entry_failure_reason,
			       run->internal.suberror);
			fflush(stdout);
			return 2;
		}
	}
}
