/*
 * The host <-> guest contract of the minimal KVM guest: memory map, status page, mailbox.
 *
 * Semantics relied on:
 *  - QEMU's `pc` machine puts guest RAM in one anonymous mapping of the QEMU process, and below
 *    the PCI hole guest-physical address == offset into that mapping. So the host finds the pages
 *    below at HVA = ram_base + GPA and reads/writes them with /proc/PID/mem or process_vm_*; the
 *    running guest sees such writes at once (no cache to flush: it is the same memory).
 *  - Both sides are x86 (TSO): stores become visible in program order. The host writes the
 *    request fields first and `request_seq` last, in a separate write; the guest writes the
 *    response fields first and `response_seq` last. Each side polls only the other's seq word,
 *    then reads the rest. Seq words are naturally aligned u64s, read and written whole.
 *
 * This header is included by the guest's C and assembly and mirrored by dvs/testing/kvm_guest.py;
 * a test compares the two. entry.S uses only the plain-integer address macros (the ULL suffixes
 * of the magic values are C-only).
 *
 * Guest-physical memory map (RAM >= 16 MiB):
 *   0x0000_0000 - 0x000F_FFFF  firmware (qboot or SeaBIOS), IVT, BDA, the PVH start info. Unused.
 *   0x0010_0000 - 0x001F_FFFF  the guest image (PVH note, code, data, page tables, stack).
 *   0x0010_1000                divert entry (DVS_GUEST_DIVERT_ENTRY): point vCPU RIP here (e.g.
 *                              KVM_SET_REGS) and the guest prints a line, counts the
 *                              diversion and resumes its main loop on a fresh stack
 *                              (a mailbox request cut short is then served again). Divert
 *                              from the main loop, not from inside an interrupt handler.
 *   0x0020_0000                status page  (DVS_GUEST_STATUS_GPA, 4 KiB), written by the guest.
 *   0x0020_1000                mailbox page (DVS_GUEST_MAILBOX_GPA, 4 KiB), shared.
 *   0x0030_0000 - 0x003F_FFFF  scratch (DVS_GUEST_SCRATCH_GPA, 1 MiB): the guest never touches
 *                              it on its own; tests put values there for READ commands.
 *   0xFEC0_0000                IOAPIC, 0xFEE0_0000 LAPIC (in-kernel irqchip under KVM).
 * Virtual memory: 0 - 4 GiB identity-mapped with 2 MiB pages (cacheable); one extra 2 MiB
 * "window" page at DVS_GUEST_WINDOW_VA, uncached, that the guest points at any GPA below
 * 2^MAXPHYADDR for READ/WRITE commands (so GPAs above 4 GiB, e.g. a memslot added by the host,
 * are reachable too).
 */
#ifndef DVS_GUEST_ABI_H
#define DVS_GUEST_ABI_H

#define DVS_GUEST_LOAD_GPA     0x00100000
#define DVS_GUEST_STATUS_GPA   0x00200000
#define DVS_GUEST_MAILBOX_GPA  0x00201000
#define DVS_GUEST_SCRATCH_GPA  0x00300000
#define DVS_GUEST_SCRATCH_SIZE 0x00100000
#define DVS_GUEST_WINDOW_VA    0x0000008000000000 /* PML4 slot 1: 512 GiB */
#define DVS_GUEST_DIVERT_ENTRY 0x00101000 /* identity-mapped: GPA == GVA (guest.ld asserts) */

/* The first line every boot prints once long mode, serial, status page and mailbox are up. */
#define DVS_GUEST_READY_MARKER "DVS-MINIMAL-GUEST-READY"

/* ---- status page (guest writes, host reads; host may write report_period_tsc) ---- */
#define DVS_STATUS_MAGIC_VALUE 0x5355544154535644ULL /* "DVSTATUS" in little-endian bytes */
#define DVS_STATUS_MAGIC            0x000 /* u64 DVS_STATUS_MAGIC_VALUE once the page is valid */
#define DVS_STATUS_HEARTBEAT        0x008 /* u64 incremented on every main-loop iteration */
#define DVS_STATUS_REPORT_PERIOD    0x010 /* u64 TSC ticks between heartbeat lines (host may set) */
#define DVS_STATUS_REPORTS          0x018 /* u64 heartbeat lines printed so far */
#define DVS_STATUS_PVH_START_INFO   0x020 /* u64 EBX at entry: GPA of the hvm_start_info */
#define DVS_STATUS_MAXPHYADDR       0x028 /* u64 CPUID 0x80000008 EAX[7:0] */
#define DVS_STATUS_IRQ_TOTAL        0x030 /* u64 interrupts taken (vectors >= 32 plus NMI) */
#define DVS_STATUS_LAST_VECTOR      0x038 /* u64 vector of the latest interrupt */
#define DVS_STATUS_FAULT_VECTOR     0x040 /* u64 exception vector + 1 once the guest died, else 0 */
#define DVS_STATUS_FAULT_ERROR      0x048 /* u64 exception error code */
#define DVS_STATUS_FAULT_RIP        0x050 /* u64 faulting RIP */
#define DVS_STATUS_FAULT_CR2        0x058 /* u64 CR2 at the fault */
#define DVS_STATUS_IRQ_MODE         0x060 /* u64 DVS_IRQ_MODE_* currently configured */
#define DVS_STATUS_DIVERSIONS       0x068 /* u64 times the divert entry ran */
#define DVS_STATUS_IRQ_COUNTS       0x800 /* u64[256]: interrupts taken per vector */

/* ---- mailbox page ---- */
#define DVS_MAILBOX_MAGIC_VALUE 0x31584f424d535644ULL /* "DVSMBOX1" */
#define DVS_MAILBOX_MAGIC        0x000 /* u64 set by the guest when the mailbox is served */
#define DVS_MAILBOX_REQUEST_SEQ  0x008 /* u64 host: bump (written last) to submit a request */
#define DVS_MAILBOX_COMMAND      0x010 /* u64 host: DVS_CMD_* */
#define DVS_MAILBOX_ARG0         0x018 /* u64 host: arguments, meaning per command */
#define DVS_MAILBOX_ARG1         0x020
#define DVS_MAILBOX_ARG2         0x028
#define DVS_MAILBOX_ARG3         0x030
#define DVS_MAILBOX_STATUS       0x040 /* u64 guest: DVS_MBOX_* result code */
#define DVS_MAILBOX_RESULT       0x048 /* u64 guest: the command's value */
#define DVS_MAILBOX_RESPONSE_SEQ 0x050 /* u64 guest: = request_seq once status/result are final */

/* Commands. Widths are 1, 2, 4 or 8 bytes (port I/O: 1, 2 or 4); a GPA must be aligned to it. */
#define DVS_CMD_PING        1  /* -> result = heartbeat */
#define DVS_CMD_READ        2  /* arg0 gpa, arg1 width -> result = value read (RAM or MMIO) */
#define DVS_CMD_WRITE       3  /* arg0 gpa, arg1 value, arg2 width */
#define DVS_CMD_PORT_IN     4  /* arg0 port, arg1 width -> result = value */
#define DVS_CMD_PORT_OUT    5  /* arg0 port, arg1 value, arg2 width */
#define DVS_CMD_PIC_SETUP   6  /* arg0 unmask bits (bit n = ISA IRQ n): 8259 pair remapped to
                                  vectors 0x20-0x2F, EOI by port; LAPIC enabled with LINT0 =
                                  ExtINT (so the PIC reaches the vCPU), LINT1 = NMI */
#define DVS_CMD_APIC_SETUP  7  /* remap + mask both 8259s, LAPIC enabled (spurious 0xFF,
                                  LINT0 masked, LINT1 = NMI) -> result = LAPIC ID; IOAPIC pins
                                  stay masked until IOAPIC_ROUTE */
#define DVS_CMD_IOAPIC_ROUTE 8 /* arg0 pin, arg1 vector (0x30-0xEF), arg2 DVS_ROUTE_* flags:
                                  program+unmask the redirection entry to the boot CPU;
                                  result = the entry's previous low dword */
#define DVS_CMD_IRQ_ENABLE  9  /* sti: the main loop then runs with interrupts on */
#define DVS_CMD_IRQ_DISABLE 10 /* cli */
#define DVS_CMD_HALT        11 /* sti; hlt: return after the next interrupt; result = IRQ total */
#define DVS_CMD_SELF_IPI    12 /* arg0 vector: LAPIC fixed IPI to self (needs APIC_SETUP) */

#define DVS_ROUTE_LEVEL      0x1 /* level-triggered (default edge) */
#define DVS_ROUTE_ACTIVE_LOW 0x2 /* active-low polarity (default high) */

#define DVS_IRQ_MODE_NONE 0
#define DVS_IRQ_MODE_PIC  1
#define DVS_IRQ_MODE_APIC 2

/* Response status codes. */
#define DVS_MBOX_OK          0
#define DVS_MBOX_BAD_COMMAND 1
#define DVS_MBOX_BAD_ARGUMENT 2

/* Interrupt vectors the guest uses. */
#define DVS_VECTOR_PIC_BASE    0x20 /* 8259 IRQ n -> 0x20 + n */
#define DVS_VECTOR_APIC_FIRST  0x30 /* first vector IOAPIC routes / IPIs may use */
#define DVS_VECTOR_APIC_LAST   0xEF
#define DVS_VECTOR_SPURIOUS    0xFF

#endif
