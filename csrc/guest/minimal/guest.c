/*
 * The minimal KVM guest's 64-bit part: serial console, heartbeat, mailbox, interrupts.
 *
 * Semantics relied on:
 *  - COM1 is a 16550A at I/O port 0x3F8 (QEMU `-serial`): writing THR (port+0) sends a byte once
 *    LSR (port+5) bit 5 says the holding register is empty. MCR.OUT2 stays 0, so the UART never
 *    drives its interrupt line unless a test asks for it.
 *  - The status page and mailbox (guest_abi.h) are plain RAM the host reads and writes through
 *    QEMU's memory. The main loop polls `request_seq` with volatile loads; each request is served
 *    once, the response published by writing `response_seq` last (x86 stores are not reordered
 *    with each other). Every access to shared memory is volatile: the host changes it behind the
 *    compiler's back.
 *  - Interrupts: an 8259 pair remapped to vectors 0x20-0x2F (EOI: OCW2 0x20 to port 0x20, and to
 *    0xA0 first for the slave), or the local APIC at 0xFEE00000 (EOI: write 0 to offset 0xB0)
 *    fed by the IOAPIC at 0xFEC00000 (IOREGSEL at +0, IOWIN at +0x10; redirection entry n is
 *    registers 0x10 + 2n (low: vector, polarity bit 13, trigger bit 15, mask bit 16) and
 *    0x11 + 2n (high: destination APIC ID in bits 24-31)). Under KVM both chips are emulated in
 *    the host kernel (QEMU's default kernel-irqchip), so a GSI raised with KVM_IRQ_LINE or an irqfd
 *    reaches them directly; in QEMU's pc routing GSI n is IOAPIC pin n except GSI 0 -> pin 2.
 *  - LAPIC local lines: the LVT masks can be cleared only while the LAPIC is software-enabled
 *    (SVR bit 8); KVM passes an 8259 interrupt to the vCPU only if LVT0 is unmasked ExtINT (or
 *    the LAPIC is hardware-disabled), and QEMU's inject-nmi raises LINT1 while the LAPIC is
 *    enabled. qboot leaves both masked, so both setup commands program them.
 *  - Everything here runs at CPL 0, which under kvm-pvm means instruction by instruction in the
 *    host kernel's emulator (~1 M instructions/s, ~40 k main-loop iterations/s): keep loops
 *    short and instructions ordinary (no SSE: built with -mgeneral-regs-only).
 */
#include <stdint.h>

#include "guest_abi.h"

#define COM1 0x3F8
#define UART_THR 0
#define UART_IER 1
#define UART_DLL 0
#define UART_DLM 1
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_LSR_THR_EMPTY 0x20

#define PIC_MASTER_CMD 0x20
#define PIC_MASTER_DATA 0x21
#define PIC_SLAVE_CMD 0xA0
#define PIC_SLAVE_DATA 0xA1
#define PIC_EOI 0x20

#define LAPIC_BASE 0xFEE00000UL
#define LAPIC_ID 0x020
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0B0
#define LAPIC_SVR 0x0F0
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_LVT_MASKED 0x10000
#define LAPIC_LVT_EXTINT 0x700
#define LAPIC_LVT_NMI 0x400
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310
#define LAPIC_SVR_ENABLE 0x100
#define LAPIC_ICR_SELF 0x40000 /* destination shorthand 01: self */
#define LAPIC_ICR_PENDING 0x1000
#define MSR_APIC_BASE 0x1B
#define MSR_APIC_BASE_ENABLE 0x800

#define IOAPIC_BASE 0xFEC00000UL
#define IOAPIC_REGSEL 0x00
#define IOAPIC_WINDOW 0x10
#define IOAPIC_REG_VERSION 0x01
#define IOAPIC_REDIRECTION(pin) (0x10 + 2 * (pin))
#define IOAPIC_MASKED 0x10000
#define IOAPIC_LEVEL 0x8000
#define IOAPIC_ACTIVE_LOW 0x2000

#define GDT_CODE64 0x08
#define IDT_INTERRUPT_GATE 0x8E /* present, DPL 0, 64-bit interrupt gate */

#define PTE_2M_UNCACHED 0x9B /* present, writable, PWT, PCD, PS */
#define TWO_MIB 0x200000UL

#define DEFAULT_REPORT_PERIOD_TSC (1UL << 31) /* ~0.5-1 s at the TSC rates seen on x86 hosts */

typedef uint64_t u64;
typedef uint32_t u32;
typedef uint16_t u16;
typedef uint8_t u8;

/* The frame entry.S builds: its pushes in reverse, then what the CPU pushed. */
struct interrupt_frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error_code;
    u64 rip, cs, rflags, rsp, ss;
};

struct idt_gate {
    u16 offset_low;
    u16 selector;
    u8 ist;
    u8 type_attributes;
    u16 offset_middle;
    u32 offset_high;
    u32 reserved;
} __attribute__((packed));

struct idt_descriptor {
    u16 limit;
    u64 base;
} __attribute__((packed));

extern const u64 dvs_guest_interrupt_stubs[256];
extern volatile u64 dvs_guest_window_pd[512];

void dvs_guest_main(u32 start_info_gpa) __attribute__((noreturn));
void dvs_guest_diverted(void) __attribute__((noreturn));
void dvs_guest_interrupt(struct interrupt_frame *frame);

static struct idt_gate idt[256] __attribute__((aligned(16)));
static u64 window_mapped_base = ~0UL; /* GPA the window PDE points at, ~0 = none */
static u64 max_physical_address_bits;
static int interrupts_enabled;

/* ---- shared pages ---- */

static inline volatile u64 *status_word(u64 offset)
{
    return (volatile u64 *)(DVS_GUEST_STATUS_GPA + offset);
}

static inline volatile u64 *mailbox_word(u64 offset)
{
    return (volatile u64 *)(DVS_GUEST_MAILBOX_GPA + offset);
}

/* gcc may turn loops into calls to these even when freestanding. */
void *memset(void *destination, int value, unsigned long length);
void *memset(void *destination, int value, unsigned long length)
{
    volatile u8 *bytes = destination;
    for (unsigned long i = 0; i < length; i++)
        bytes[i] = (u8)value;
    return destination;
}

/* ---- port I/O and CPU helpers ---- */

static inline void outb(u16 port, u8 value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline void outw(u16 port, u16 value)
{
    __asm__ volatile("outw %0, %1" : : "a"(value), "Nd"(port));
}

static inline void outl(u16 port, u32 value)
{
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port));
}

static inline u8 inb(u16 port)
{
    u8 value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline u16 inw(u16 port)
{
    u16 value;
    __asm__ volatile("inw %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline u32 inl(u16 port)
{
    u32 value;
    __asm__ volatile("inl %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline u64 rdtsc(void)
{
    u32 low, high;
    __asm__ volatile("rdtsc" : "=a"(low), "=d"(high));
    return ((u64)high << 32) | low;
}

static inline u64 rdmsr(u32 msr)
{
    u32 low, high;
    __asm__ volatile("rdmsr" : "=a"(low), "=d"(high) : "c"(msr));
    return ((u64)high << 32) | low;
}

static inline void wrmsr(u32 msr, u64 value)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)value), "d"((u32)(value >> 32)));
}

static inline u64 read_cr2(void)
{
    u64 value;
    __asm__ volatile("mov %%cr2, %0" : "=r"(value));
    return value;
}

static inline void cpuid(u32 leaf, u32 *eax, u32 *ebx, u32 *ecx, u32 *edx)
{
    __asm__ volatile("cpuid" : "=a"(*eax), "=b"(*ebx), "=c"(*ecx), "=d"(*edx) : "a"(leaf), "c"(0));
}

static inline void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* ---- serial console ---- */

static void serial_init(void)
{
    outb(COM1 + UART_IER, 0x00);
    outb(COM1 + UART_LCR, 0x80); /* DLAB: the next two ports are the divisor */
    outb(COM1 + UART_DLL, 0x01); /* 115200 baud */
    outb(COM1 + UART_DLM, 0x00);
    outb(COM1 + UART_LCR, 0x03); /* 8N1 */
    outb(COM1 + UART_FCR, 0xC7); /* FIFOs on and cleared */
    outb(COM1 + UART_MCR, 0x03); /* DTR, RTS; OUT2 off: no interrupt line */
}

static void serial_putc(char c)
{
    while (!(inb(COM1 + UART_LSR) & UART_LSR_THR_EMPTY))
        ;
    outb(COM1 + UART_THR, (u8)c);
}

static void put_string(const char *text)
{
    while (*text)
        serial_putc(*text++);
}

static void put_hex(u64 value)
{
    static const char digits[] = "0123456789abcdef";
    int shift = 60;
    put_string("0x");
    while (shift > 0 && ((value >> shift) & 0xF) == 0)
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        serial_putc(digits[(value >> shift) & 0xF]);
}

static void put_decimal(u64 value)
{
    char buffer[21];
    int position = 20;
    buffer[position] = 0;
    do {
        buffer[--position] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    put_string(&buffer[position]);
}

/* ---- interrupt controllers ---- */

static inline volatile u32 *lapic_register(u32 offset)
{
    return (volatile u32 *)(LAPIC_BASE + offset);
}

static u32 ioapic_read(u32 reg)
{
    *(volatile u32 *)(IOAPIC_BASE + IOAPIC_REGSEL) = reg;
    return *(volatile u32 *)(IOAPIC_BASE + IOAPIC_WINDOW);
}

static void ioapic_write(u32 reg, u32 value)
{
    *(volatile u32 *)(IOAPIC_BASE + IOAPIC_REGSEL) = reg;
    *(volatile u32 *)(IOAPIC_BASE + IOAPIC_WINDOW) = value;
}

/* ICW1-4: edge-triggered cascade, vectors 0x20/0x28, slave on IRQ 2, 8086 mode; then the masks. */
static void pic_remap(u16 unmasked_irqs)
{
    outb(PIC_MASTER_CMD, 0x11);
    outb(PIC_SLAVE_CMD, 0x11);
    outb(PIC_MASTER_DATA, DVS_VECTOR_PIC_BASE);
    outb(PIC_SLAVE_DATA, DVS_VECTOR_PIC_BASE + 8);
    outb(PIC_MASTER_DATA, 0x04);
    outb(PIC_SLAVE_DATA, 0x02);
    outb(PIC_MASTER_DATA, 0x01);
    outb(PIC_SLAVE_DATA, 0x01);
    if (unmasked_irqs & 0xFF00)
        unmasked_irqs |= 1 << 2; /* the slave's requests pass through master IRQ 2 */
    outb(PIC_MASTER_DATA, (u8)~unmasked_irqs);
    outb(PIC_SLAVE_DATA, (u8)~(unmasked_irqs >> 8));
}

/* Software-enable the LAPIC and wire LINT0/LINT1 the way PC firmware does (see the top note). */
static void lapic_enable(int accept_pic)
{
    u64 base = rdmsr(MSR_APIC_BASE);
    if (!(base & MSR_APIC_BASE_ENABLE))
        wrmsr(MSR_APIC_BASE, base | MSR_APIC_BASE_ENABLE);
    *lapic_register(LAPIC_SVR) = LAPIC_SVR_ENABLE | DVS_VECTOR_SPURIOUS;
    *lapic_register(LAPIC_TPR) = 0;
    *lapic_register(LAPIC_LVT_LINT0) = accept_pic ? LAPIC_LVT_EXTINT : LAPIC_LVT_MASKED;
    *lapic_register(LAPIC_LVT_LINT1) = LAPIC_LVT_NMI;
}

static void acknowledge(u64 vector)
{
    if (vector >= DVS_VECTOR_PIC_BASE && vector < DVS_VECTOR_PIC_BASE + 16) {
        if (vector >= DVS_VECTOR_PIC_BASE + 8)
            outb(PIC_SLAVE_CMD, PIC_EOI);
        outb(PIC_MASTER_CMD, PIC_EOI);
    } else if (vector >= DVS_VECTOR_APIC_FIRST && vector <= DVS_VECTOR_APIC_LAST) {
        *lapic_register(LAPIC_EOI) = 0;
    }
    /* NMI (2) and the LAPIC spurious vector need no EOI. */
}

static void report_fault(const struct interrupt_frame *frame)
{
    u64 cr2 = read_cr2();
    *status_word(DVS_STATUS_FAULT_ERROR) = frame->error_code;
    *status_word(DVS_STATUS_FAULT_RIP) = frame->rip;
    *status_word(DVS_STATUS_FAULT_CR2) = cr2;
    *status_word(DVS_STATUS_FAULT_VECTOR) = frame->vector + 1;
    put_string("DVS-GUEST fault vector=");
    put_decimal(frame->vector);
    put_string(" error=");
    put_hex(frame->error_code);
    put_string(" rip=");
    put_hex(frame->rip);
    put_string(" cr2=");
    put_hex(cr2);
    put_string("\n");
    halt_forever();
}

void dvs_guest_interrupt(struct interrupt_frame *frame)
{
    u64 vector = frame->vector & 0xFF;
    if (vector < 32 && vector != 2) /* exceptions are fatal: this guest never expects one */
        report_fault(frame);
    status_word(DVS_STATUS_IRQ_COUNTS)[vector]++;
    *status_word(DVS_STATUS_IRQ_TOTAL) += 1;
    *status_word(DVS_STATUS_LAST_VECTOR) = vector;
    acknowledge(vector);
}

static void idt_install(void)
{
    for (int vector = 0; vector < 256; vector++) {
        u64 handler = dvs_guest_interrupt_stubs[vector];
        idt[vector].offset_low = (u16)handler;
        idt[vector].selector = GDT_CODE64;
        idt[vector].ist = 0;
        idt[vector].type_attributes = IDT_INTERRUPT_GATE;
        idt[vector].offset_middle = (u16)(handler >> 16);
        idt[vector].offset_high = (u32)(handler >> 32);
        idt[vector].reserved = 0;
    }
    struct idt_descriptor descriptor = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" : : "m"(descriptor));
}

/* ---- the GPA window ---- */

/* Map the 2 MiB frame holding `gpa` at DVS_GUEST_WINDOW_VA (uncached) and return its VA. */
static volatile void *window_map(u64 gpa)
{
    u64 base = gpa & ~(TWO_MIB - 1);
    if (base != window_mapped_base) {
        dvs_guest_window_pd[0] = base | PTE_2M_UNCACHED;
        __asm__ volatile("invlpg (%0)" : : "r"(DVS_GUEST_WINDOW_VA) : "memory");
        window_mapped_base = base;
    }
    return (volatile void *)(DVS_GUEST_WINDOW_VA + (gpa - base));
}

static int valid_width(u64 width, int allow_eight)
{
    return width == 1 || width == 2 || width == 4 || (allow_eight && width == 8);
}

static int gpa_reachable(u64 gpa, u64 width)
{
    return (gpa >> max_physical_address_bits) == 0 && (gpa & (width - 1)) == 0;
}

static u64 memory_read(u64 gpa, u64 width)
{
    volatile void *address = window_map(gpa);
    switch (width) {
    case 1: return *(volatile u8 *)address;
    case 2: return *(volatile u16 *)address;
    case 4: return *(volatile u32 *)address;
    default: return *(volatile u64 *)address;
    }
}

static void memory_write(u64 gpa, u64 value, u64 width)
{
    volatile void *address = window_map(gpa);
    switch (width) {
    case 1: *(volatile u8 *)address = (u8)value; break;
    case 2: *(volatile u16 *)address = (u16)value; break;
    case 4: *(volatile u32 *)address = (u32)value; break;
    default: *(volatile u64 *)address = value; break;
    }
}

static u64 port_read(u16 port, u64 width)
{
    switch (width) {
    case 1: return inb(port);
    case 2: return inw(port);
    default: return inl(port);
    }
}

static void port_write(u16 port, u64 value, u64 width)
{
    switch (width) {
    case 1: outb(port, (u8)value); break;
    case 2: outw(port, (u16)value); break;
    default: outl(port, (u32)value); break;
    }
}

/* ---- mailbox ---- */

struct request {
    u64 command, arg0, arg1, arg2, arg3;
};

/* Serve one request; returns a DVS_MBOX_* status and sets *result. */
static u64 execute(const struct request *request, u64 *result)
{
    *result = 0;
    switch (request->command) {
    case DVS_CMD_PING:
        *result = *status_word(DVS_STATUS_HEARTBEAT);
        return DVS_MBOX_OK;
    case DVS_CMD_READ:
        if (!valid_width(request->arg1, 1) || !gpa_reachable(request->arg0, request->arg1))
            return DVS_MBOX_BAD_ARGUMENT;
        *result = memory_read(request->arg0, request->arg1);
        return DVS_MBOX_OK;
    case DVS_CMD_WRITE:
        if (!valid_width(request->arg2, 1) || !gpa_reachable(request->arg0, request->arg2))
            return DVS_MBOX_BAD_ARGUMENT;
        memory_write(request->arg0, request->arg1, request->arg2);
        return DVS_MBOX_OK;
    case DVS_CMD_PORT_IN:
        if (!valid_width(request->arg1, 0) || request->arg0 > 0xFFFF)
            return DVS_MBOX_BAD_ARGUMENT;
        *result = port_read((u16)request->arg0, request->arg1);
        return DVS_MBOX_OK;
    case DVS_CMD_PORT_OUT:
        if (!valid_width(request->arg2, 0) || request->arg0 > 0xFFFF)
            return DVS_MBOX_BAD_ARGUMENT;
        port_write((u16)request->arg0, request->arg1, request->arg2);
        return DVS_MBOX_OK;
    case DVS_CMD_PIC_SETUP:
        if (request->arg0 > 0xFFFF)
            return DVS_MBOX_BAD_ARGUMENT;
        pic_remap((u16)request->arg0);
        lapic_enable(1);
        *status_word(DVS_STATUS_IRQ_MODE) = DVS_IRQ_MODE_PIC;
        return DVS_MBOX_OK;
    case DVS_CMD_APIC_SETUP:
        pic_remap(0); /* remapped and fully masked: no 8259 vector over an exception's */
        lapic_enable(0);
        *status_word(DVS_STATUS_IRQ_MODE) = DVS_IRQ_MODE_APIC;
        *result = *lapic_register(LAPIC_ID) >> 24;
        return DVS_MBOX_OK;
    case DVS_CMD_IOAPIC_ROUTE: {
        u64 pin = request->arg0, vector = request->arg1, flags = request->arg2;
        u64 last_pin = (ioapic_read(IOAPIC_REG_VERSION) >> 16) & 0xFF;
        if (pin > last_pin || vector < DVS_VECTOR_APIC_FIRST || vector > DVS_VECTOR_APIC_LAST)
            return DVS_MBOX_BAD_ARGUMENT;
        u32 low = (u32)vector;
        if (flags & DVS_ROUTE_LEVEL)
            low |= IOAPIC_LEVEL;
        if (flags & DVS_ROUTE_ACTIVE_LOW)
            low |= IOAPIC_ACTIVE_LOW;
        *result = ioapic_read(IOAPIC_REDIRECTION((u32)pin));
        ioapic_write(IOAPIC_REDIRECTION((u32)pin), IOAPIC_MASKED); /* mask while rewriting */
        ioapic_write(IOAPIC_REDIRECTION((u32)pin) + 1, *lapic_register(LAPIC_ID) & 0xFF000000);
        ioapic_write(IOAPIC_REDIRECTION((u32)pin), low);
        return DVS_MBOX_OK;
    }
    case DVS_CMD_IRQ_ENABLE:
        interrupts_enabled = 1;
        __asm__ volatile("sti" ::: "memory");
        return DVS_MBOX_OK;
    case DVS_CMD_IRQ_DISABLE:
        interrupts_enabled = 0;
        __asm__ volatile("cli" ::: "memory");
        return DVS_MBOX_OK;
    case DVS_CMD_HALT:
        /* STI's one-instruction shadow makes "sti; hlt" atomic: no wake-up is lost. */
        __asm__ volatile("sti; hlt" ::: "memory");
        if (!interrupts_enabled)
            __asm__ volatile("cli" ::: "memory");
        *result = *status_word(DVS_STATUS_IRQ_TOTAL);
        return DVS_MBOX_OK;
    case DVS_CMD_SELF_IPI:
        if (request->arg0 < DVS_VECTOR_APIC_FIRST || request->arg0 > DVS_VECTOR_APIC_LAST)
            return DVS_MBOX_BAD_ARGUMENT;
        *lapic_register(LAPIC_ICR_HIGH) = 0;
        *lapic_register(LAPIC_ICR_LOW) = LAPIC_ICR_SELF | (u32)request->arg0;
        while (*lapic_register(LAPIC_ICR_LOW) & LAPIC_ICR_PENDING)
            ;
        return DVS_MBOX_OK;
    default:
        return DVS_MBOX_BAD_COMMAND;
    }
}

static void serve_mailbox(u64 sequence)
{
    struct request request = {
        *mailbox_word(DVS_MAILBOX_COMMAND), *mailbox_word(DVS_MAILBOX_ARG0),
        *mailbox_word(DVS_MAILBOX_ARG1), *mailbox_word(DVS_MAILBOX_ARG2),
        *mailbox_word(DVS_MAILBOX_ARG3),
    };
    u64 result;
    u64 status = execute(&request, &result);
    *mailbox_word(DVS_MAILBOX_STATUS) = status;
    *mailbox_word(DVS_MAILBOX_RESULT) = result;
    __asm__ volatile("" ::: "memory"); /* compiler barrier: the CPU keeps store order itself */
    *mailbox_word(DVS_MAILBOX_RESPONSE_SEQ) = sequence;
    put_string("DVS-GUEST mailbox seq=");
    put_decimal(sequence);
    put_string(" command=");
    put_decimal(request.command);
    put_string(" arg0=");
    put_hex(request.arg0);
    put_string(" arg1=");
    put_hex(request.arg1);
    put_string(" status=");
    put_decimal(status);
    put_string(" result=");
    put_hex(result);
    put_string("\n");
}

static void report_heartbeat(void)
{
    u64 reports = *status_word(DVS_STATUS_REPORTS) + 1;
    *status_word(DVS_STATUS_REPORTS) = reports;
    put_string("DVS-GUEST heartbeat=");
    put_decimal(*status_word(DVS_STATUS_HEARTBEAT));
    put_string(" irqs=");
    put_decimal(*status_word(DVS_STATUS_IRQ_TOTAL));
    put_string("\n");
}

/* Count, serve the mailbox, report now and then; forever. */
static void __attribute__((noreturn)) main_loop(void)
{
    u64 last_report = rdtsc();
    for (;;) {
        *status_word(DVS_STATUS_HEARTBEAT) += 1;
        u64 sequence = *mailbox_word(DVS_MAILBOX_REQUEST_SEQ);
        if (sequence != *mailbox_word(DVS_MAILBOX_RESPONSE_SEQ))
            serve_mailbox(sequence);
        u64 now = rdtsc();
        if (now - last_report >= *status_word(DVS_STATUS_REPORT_PERIOD)) {
            last_report = now;
            report_heartbeat();
        }
    }
}

void dvs_guest_main(u32 start_info_gpa)
{
    memset((void *)DVS_GUEST_STATUS_GPA, 0, 4096);
    memset((void *)DVS_GUEST_MAILBOX_GPA, 0, 4096);
    serial_init();
    idt_install();

    u32 eax, ebx, ecx, edx;
    cpuid(0x80000000, &eax, &ebx, &ecx, &edx);
    if (eax >= 0x80000008) {
        cpuid(0x80000008, &eax, &ebx, &ecx, &edx);
        max_physical_address_bits = eax & 0xFF;
    } else {
        max_physical_address_bits = 36;
    }

    *status_word(DVS_STATUS_PVH_START_INFO) = start_info_gpa;
    *status_word(DVS_STATUS_MAXPHYADDR) = max_physical_address_bits;
    *status_word(DVS_STATUS_REPORT_PERIOD) = DEFAULT_REPORT_PERIOD_TSC;
    *status_word(DVS_STATUS_MAGIC) = DVS_STATUS_MAGIC_VALUE;
    *mailbox_word(DVS_MAILBOX_MAGIC) = DVS_MAILBOX_MAGIC_VALUE;

    put_string(DVS_GUEST_READY_MARKER " long-mode status=");
    put_hex(DVS_GUEST_STATUS_GPA);
    put_string(" mailbox=");
    put_hex(DVS_GUEST_MAILBOX_GPA);
    put_string(" maxphyaddr=");
    put_decimal(max_physical_address_bits);
    put_string("\n");
    main_loop();
}

/* Reached through DVS_GUEST_DIVERT_ENTRY when the host rewrote RIP; the loop goes on. */
void dvs_guest_diverted(void)
{
    u64 diversions = *status_word(DVS_STATUS_DIVERSIONS) + 1;
    *status_word(DVS_STATUS_DIVERSIONS) = diversions;
    put_string("DVS-GUEST diverted count=");
    put_decimal(diversions);
    put_string("\n");
    main_loop();
}
