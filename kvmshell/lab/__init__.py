"""Real QEMU guests on this machine for the demo, the tests and the benchmarks: the boot-sector
guest image, the Linux guest, the launcher, network namespaces, the memory checks (and ``ramdiff``:
two RAM dumps compared page by page) and the blackout a migrated guest sees (``blackout``: timed from the guests' heartbeats on their serial consoles).

Two guests. The boot-sector guest (``image``, ``launcher``) boots in well under a second and dirties
pages that ``memcheck``/``verify`` read back through ``pmemsave``: the fast tests use it. The Linux
guest (``linux``, ``linuxguest``) is a real kernel running a real program: a stock Debian kernel
(``vmlinuz`` out of the package that ``linux-image-amd64`` depends on) and ``busybox-static``, both
fetched with ``apt-get download`` into ``~/.cache/kvmshell/lab`` (``$XDG_CACHE_HOME``;
``KVMSHELL_LAB_CACHE`` overrides), and an initramfs written here in cpio newc holding busybox, an
``/init`` script and ``workload.c`` linked static with gcc. The workload is chosen on the kernel
command line (``kvmshell.work=idle|ws|text|hotcold|sparse kvmshell.ws_mib=N kvmshell.rate=MB/s``) and checks
its own working set when asked on the serial console (``kvmshell-check ok N pages`` or ``BAD page K``),
so a page lost by a migration shows on the destination. It boots with ``-kernel/-initrd/-append`` in
about 6 s under TCG, which it uses where ``/dev/kvm`` is kvm_pvm (a stock kernel does not boot there).

May import: ``core.commands`` and the tiers below it; never a face.
"""
