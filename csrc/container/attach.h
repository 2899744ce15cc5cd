/*
 * attach.h -- the container attach child: everything that happens between fork and exec.
 *
 * dvs_attach_start() forks a single-threaded helper ("keeper") that enters the target's
 * context and forks the command inside it; see attach.c for the kernel semantics. Python
 * (dvs.container.attach) decides *what* to do -- which cgroups, which namespaces, which
 * paths to overlay, which ids and capabilities -- and fills one struct dvs_attach; C only
 * carries it out and reports each step on a SOCK_SEQPACKET socket as struct
 * dvs_attach_msg records (a PTY master or the command's pidfd travel as SCM_RIGHTS).
 */
#ifndef DVS_CONTAINER_ATTACH_H
#define DVS_CONTAINER_ATTACH_H

#include <stdint.h>

/* cffi:begin */
#define DVS_ATTACH_MODE_ATTACH 1 /* tools view at /, container root at base_dir */
#define DVS_ATTACH_MODE_EXEC 2   /* the container's own root, nothing mounted */

/* kinds of dvs_attach_msg */
#define DVS_MSG_WARN 1    /* a step failed but the attach goes on (step, index, err) */
#define DVS_MSG_FAIL 2    /* a step failed; the attach is over (step, index, err) */
#define DVS_MSG_PTY 3     /* fd: the PTY master (-1: use the fallback PTY you passed) */
#define DVS_MSG_STARTED 4 /* value: the command's host pid; fd: its pidfd */
#define DVS_MSG_STOPPED 5 /* the command stopped (value: signal) */
#define DVS_MSG_EXITED 6  /* index: CLD_EXITED/KILLED/DUMPED; value: status or signal */

/* steps (dvs_attach_msg.step) */
#define DVS_ATTACH_STEP_SYNC 1
#define DVS_ATTACH_STEP_CGROUP 2
#define DVS_ATTACH_STEP_SETNS_MNT 3
#define DVS_ATTACH_STEP_CLONE_ROOT 4
#define DVS_ATTACH_STEP_UNSHARE 5
#define DVS_ATTACH_STEP_PROPAGATION 6
#define DVS_ATTACH_STEP_TOOLS 7
#define DVS_ATTACH_STEP_CHROOT 8
#define DVS_ATTACH_STEP_BASE_DIR 9
#define DVS_ATTACH_STEP_OVERLAY 10
#define DVS_ATTACH_STEP_CWD 11
#define DVS_ATTACH_STEP_SETNS 12
#define DVS_ATTACH_STEP_PTY 13
#define DVS_ATTACH_STEP_FORK 14
#define DVS_ATTACH_STEP_STDIO 15
#define DVS_ATTACH_STEP_GROUPS 16
#define DVS_ATTACH_STEP_GID 17
#define DVS_ATTACH_STEP_CAPS 18
#define DVS_ATTACH_STEP_LSM 19
#define DVS_ATTACH_STEP_SECCOMP 20
#define DVS_ATTACH_STEP_UID 21
#define DVS_ATTACH_STEP_NO_NEW_PRIVS 22
#define DVS_ATTACH_STEP_EXEC 23
#define DVS_ATTACH_STEP_SESSION 24
#define DVS_ATTACH_STEP_OVERLAY_SOURCE 25 /* the container lacks an overlay path */
#define DVS_ATTACH_STEP_CAP_SETS 26 /* keepcaps, capset, ambient raise */

/* limits on what Python may hand over (bounds the child's fixed-size buffers) */
#define DVS_ATTACH_MAX_NS 8
#define DVS_ATTACH_MAX_CGROUPS 32
#define DVS_ATTACH_MAX_OVERLAYS 32
#define DVS_ATTACH_MAX_GROUPS 256
#define DVS_ATTACH_MAX_FILTERS 32
#define DVS_ATTACH_MAX_SPLICE_ENTRIES 4096

struct dvs_attach_msg {
	int32_t kind;
	int32_t step;
	int32_t index;
	int32_t err;
	int64_t value;
	int32_t fd; /* filled in by dvs_attach_recv from SCM_RIGHTS; -1 if none */
	int32_t pad;
};

struct dvs_attach {
	int32_t mode;         /* DVS_ATTACH_MODE_* */
	int32_t report_fd;    /* SOCK_SEQPACKET to the caller; closing it detaches */
	int32_t host_proc_fd; /* the host's /proc (LSM attr files, session clean-up) */

	/* cgroup.procs files of the target's cgroups (v2 and v1), opened O_WRONLY */
	const int32_t *cgroup_fds;
	int32_t n_cgroup_fds;

	/* the target's mount namespace and root (/proc/PID/ns/mnt, /proc/PID/root) */
	int32_t mnt_ns_fd;
	int32_t root_fd;
	/* the other namespaces, joined in this order after the mounts (user last) */
	const int32_t *ns_fds;
	const int32_t *ns_types; /* CLONE_NEW* */
	int32_t n_ns;

	/* attach mode: the tools view as a detached mount (open_tree clone or fsmount) */
	int32_t tools_fd;
	const char *base_dir;        /* absolute, where the container's root appears */
	const char *const *overlays; /* paths relative to / (e.g. "proc", "etc/hosts") */
	int32_t n_overlays;
	/* directory to start in (absolute in the final view); NULL: stay */
	const char *cwd;

	/* credentials, as seen inside the target's user namespace */
	int32_t set_ids;
	int32_t uid;
	int32_t gid;
	const uint32_t *groups;
	int32_t n_groups;
	uint64_t cap_keep; /* bounding set: keep these bits, drop all others */
	int32_t cap_last;  /* /proc/sys/kernel/cap_last_cap */
	/* the target's other sets (CapPrm/CapEff/CapInh/CapAmb), given to the command after
	 * the id change (set_cap_sets); each is cut to cap_keep first */
	int32_t set_cap_sets;
	uint64_t cap_permitted;
	uint64_t cap_effective;
	uint64_t cap_inheritable;
	uint64_t cap_ambient;
	int32_t no_new_privs;
	/* seccomp filters, oldest first: n_filters programs of filter_lens[i] sock_filter
	 * instructions each (8 bytes), concatenated in filter_insns */
	const uint8_t *filter_insns;
	const uint32_t *filter_lens;
	const uint32_t *filter_flags;
	int32_t n_filters;
	/* LSM: write lsm_value to host_proc_fd/thread-self/<lsm_attr> before exec; NULL: none */
	const char *lsm_attr;
	const char *lsm_value;

	/* the command: argv[0] is looked up in search_path (if it has no '/') */
	char *const *argv;
	char *const *envp;
	const char *search_path;

	/* terminal: use_pty opens the container's /dev/ptmx (fallback: fallback_pty_slave) */
	int32_t use_pty;
	uint16_t rows;
	uint16_t cols;
	int32_t fallback_pty_slave;
	int32_t stdio[3];    /* pipe mode: fds for 0, 1, 2 (-1: inherit) */
	int32_t new_session;  /* pipe mode: setsid() (a PTY session always is one) */
	int32_t kill_session; /* on exit or detach, SIGKILL what is left in the session */

	/* out */
	int32_t pid;   /* the keeper */
	int32_t pidfd; /* its pidfd */
};

/* Fork the keeper and return at once (pid/pidfd filled in); progress arrives on report_fd. */
int dvs_attach_start(struct dvs_attach *req);

/* Receive one report (blocking; timeout_ms < 0: forever). Returns 1, 0 at EOF, or -errno
 * (-ETIMEDOUT after timeout_ms). */
int dvs_attach_recv(int fd, struct dvs_attach_msg *msg, int32_t timeout_ms);

/* Copy the seccomp filters of process pid (needs ptrace access; the target stops for the
 * few microseconds the copy takes). Filters come oldest first into insns (capacity
 * insns_cap bytes); lens/flags get one entry per filter (capacity max_filters).
 * Returns the number of filters or -errno. */
int dvs_seccomp_copy(int32_t pid, uint8_t *insns, uint32_t insns_cap, uint32_t *lens,
		     uint32_t *flags, uint32_t max_filters);

/* The session id (field 6) of a /proc/PID/stat text, or -1 if it is malformed. Used by the
 * keeper's session clean-up; exported for property tests. */
int dvs_proc_stat_session(const char *stat, int64_t len);
/* cffi:end */

#endif /* DVS_CONTAINER_ATTACH_H */
