"""VM attach, part one: find and understand a running Linux guest from the hypervisor's memory.

``memory`` finds guest RAM in a hypervisor process, ``kernel`` locates the guest kernel in it
(image, KASLR offsets, page-table root, paging mode), ``kallsyms``/``ksyms``/``btf`` read the
kernel's own symbol and type tables, ``paging`` walks x86-64 page tables, ``inspect`` ties it
together for ``dvs vm inspect``, ``coredump`` writes an ELF core, and ``sideload`` makes the
guest kernel run a payload of ours once. No KVM and no CPU registers are needed anywhere.
"""
