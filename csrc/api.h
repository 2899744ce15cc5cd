/*
 * api.h -- system headers the generated cffi module needs for the constants it exports
 * (cffi:constants lists in the capability headers). glibc's <sys/mount.h> and
 * <linux/mount.h> clash on Debian 12, so the mount API constants come from the kernel
 * header and MNT_DETACH is spelled out.
 */
#ifndef DVS_API_H
#define DVS_API_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <sched.h>
#include <linux/mount.h>
#include <linux/openat2.h>
#include <linux/userfaultfd.h>
#include "compat.h"
#ifndef MNT_DETACH
#define MNT_DETACH 2
#endif
#endif
