"""The typed block values (``BlockDevice``, ``BlockImage``, ``BlockJob``, ``NbdServer``) parsed from
replies captured from QEMU 7.2.22 (the real-QEMU tests in test_monitor.py and test_storage.py check
them live). Paths were rewritten to /srv/lab; nothing else was changed."""

from __future__ import annotations

import json

from kvmshell.core.values.models import BlockDevice, BlockImage, BlockJob, BlockJobStatus, NbdServer

# query-block: a boot disk over a raw base, a qcow2 data disk over a two-image chain, a read-only raw
# disk, an empty CD-ROM drive (-drive if=none,id=empty0 -device ide-cd,drive=empty0,id=cd0)
QUERY_BLOCK = """[
{"io-status": "ok", "device": "ide0-hd0", "locked": false, "removable": false, "inserted": {"iops_rd": 0,
"detect_zeroes": "off", "image": {"backing-image": {"virtual-size": 1048576, "filename":
"/srv/lab/boot-256-0.raw", "format": "raw", "actual-size": 1048576, "dirty-flag": false},
"backing-filename-format": "raw", "virtual-size": 1048576, "filename": "/srv/lab/vm.qcow2", "cluster-size":
65536, "format": "qcow2", "actual-size": 200704, "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
"compression-type": "zlib", "lazy-refcounts": false, "refcount-bits": 16, "corrupt": false, "extended-l2":
false}}, "full-backing-filename": "/srv/lab/boot-256-0.raw", "backing-filename": "/srv/lab/boot-256-0.raw",
"dirty-flag": false}, "iops_wr": 0, "ro": false, "node-name": "#block128", "backing_file_depth": 1, "drv":
"qcow2", "iops": 0, "bps_wr": 0, "write_threshold": 0, "backing_file": "/srv/lab/boot-256-0.raw", "encrypted":
false, "bps": 0, "bps_rd": 0, "cache": {"no-flush": true, "direct": false, "writeback": true}, "file":
"/srv/lab/vm.qcow2"}, "qdev": "/machine/unattached/device[18]", "type": "unknown"},
{"io-status": "ok", "device": "data0", "locked": false, "removable": false, "inserted": {"iops_rd": 0,
"detect_zeroes": "off", "image": {"backing-image": {"backing-image": {"virtual-size": 16777216, "filename":
"/srv/lab/base.qcow2", "cluster-size": 65536, "format": "qcow2", "actual-size": 200704, "format-specific":
{"type": "qcow2", "data": {"compat": "1.1", "compression-type": "zlib", "lazy-refcounts": false,
"refcount-bits": 16, "corrupt": false, "extended-l2": false}}, "dirty-flag": false}, "backing-filename-format":
"qcow2", "virtual-size": 16777216, "filename": "/srv/lab/mid.qcow2", "cluster-size": 65536, "format": "qcow2",
"actual-size": 200704, "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "compression-type":
"zlib", "lazy-refcounts": false, "refcount-bits": 16, "corrupt": false, "extended-l2": false}},
"full-backing-filename": "/srv/lab/base.qcow2", "backing-filename": "/srv/lab/base.qcow2", "dirty-flag": false},
"backing-filename-format": "qcow2", "virtual-size": 16777216, "filename": "/srv/lab/top.qcow2", "cluster-size":
65536, "format": "qcow2", "actual-size": 200704, "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
"compression-type": "zlib", "lazy-refcounts": false, "refcount-bits": 16, "corrupt": false, "extended-l2":
false}}, "full-backing-filename": "/srv/lab/mid.qcow2", "backing-filename": "/srv/lab/mid.qcow2", "dirty-flag":
false}, "iops_wr": 0, "ro": false, "node-name": "#block507", "backing_file_depth": 2, "drv": "qcow2", "iops": 0,
"bps_wr": 0, "write_threshold": 0, "backing_file": "/srv/lab/mid.qcow2", "encrypted": false, "bps": 0, "bps_rd":
0, "cache": {"no-flush": false, "direct": false, "writeback": true}, "file": "/srv/lab/top.qcow2"}, "qdev":
"/machine/peripheral-anon/device[0]/virtio-backend", "type": "unknown"},
{"io-status": "ok", "device": "data1", "locked": false, "removable": false, "inserted": {"iops_rd": 0,
"detect_zeroes": "off", "image": {"virtual-size": 8388608, "filename": "/srv/lab/raw.img", "format": "raw",
"actual-size": 4096, "dirty-flag": false}, "iops_wr": 0, "ro": true, "node-name": "#block1141",
"backing_file_depth": 0, "drv": "raw", "iops": 0, "bps_wr": 0, "write_threshold": 0, "encrypted": false, "bps":
0, "bps_rd": 0, "cache": {"no-flush": false, "direct": false, "writeback": true}, "file": "/srv/lab/raw.img"},
"qdev": "/machine/peripheral-anon/device[1]/virtio-backend", "type": "unknown"},
{"io-status": "ok", "device": "empty0", "locked": false, "removable": true, "qdev": "cd0", "tray_open": false,
"type": "unknown"}
]"""

# query-block: a disk defined with -blockdev (no drive id) and -device virtio-blk-pci,id=vd1
QUERY_BLOCK_BLOCKDEV = """[
{"io-status": "ok", "device": "", "locked": false, "removable": false, "inserted": {"iops_rd": 0,
"detect_zeroes": "off", "image": {"virtual-size": 33554432, "filename": "/srv/lab/bd.img", "format": "raw",
"actual-size": 33554432, "dirty-flag": false}, "iops_wr": 0, "ro": false, "node-name": "bd0",
"backing_file_depth": 0, "drv": "raw", "iops": 0, "bps_wr": 0, "write_threshold": 0, "encrypted": false, "bps":
0, "bps_rd": 0, "cache": {"no-flush": false, "direct": false, "writeback": true}, "file": "/srv/lab/bd.img"},
"qdev": "/machine/peripheral/vd1/virtio-backend", "type": "unknown"}]"""

# query-block-jobs: a mirror capped at 4 MiB/s half-way through 32 MiB, then a mirror in sync
MIRROR_COPYING = """[{"auto-finalize": true, "io-status": "ok", "device": "kvmshell-mirror-0", "auto-dismiss": true,
"busy": false, "len": 33554432, "offset": 16777216, "status": "running", "paused": false, "speed": 4194304,
"ready": false, "type": "mirror"}]"""
MIRROR_READY = """[{"auto-finalize": true, "io-status": "ok", "device": "m0", "auto-dismiss": true, "busy": false,
"len": 16777216, "offset": 16777216, "status": "ready", "paused": false, "speed": 0, "ready": true,
"type": "mirror"}]"""


def devices(reply: str) -> dict[str, BlockDevice]:
    return {d.key: d for d in map(BlockDevice.from_qmp, json.loads(reply))}


def test_a_disk_and_its_backing_chain() -> None:
    data0 = devices(QUERY_BLOCK)["data0"]
    assert data0 == BlockDevice(
        device="data0", qdev="/machine/peripheral-anon/device[0]/virtio-backend", node_name="#block507",
        writable=True, image=BlockImage("/srv/lab/top.qcow2", "qcow2", 16 << 20),
        backing=(BlockImage("/srv/lab/mid.qcow2", "qcow2", 16 << 20),
                 BlockImage("/srv/lab/base.qcow2", "qcow2", 16 << 20)))
    boot = devices(QUERY_BLOCK)["ide0-hd0"]
    assert boot.node_name == "#block128" and boot.writable
    assert boot.image == BlockImage("/srv/lab/vm.qcow2", "qcow2", 1 << 20)
    assert boot.backing == (BlockImage("/srv/lab/boot-256-0.raw", "raw", 1 << 20),)


def test_read_only_and_empty_drives() -> None:
    found = devices(QUERY_BLOCK)
    assert list(found) == ["ide0-hd0", "data0", "data1", "empty0"]
    data1 = found["data1"]
    assert not data1.writable and data1.backing == ()
    assert data1.image == BlockImage("/srv/lab/raw.img", "raw", 8 << 20)
    empty = found["empty0"]
    assert empty == BlockDevice(device="empty0", qdev="cd0", node_name="", writable=False, image=None)


def test_a_drive_without_id_is_named_by_its_device() -> None:
    [dev] = devices(QUERY_BLOCK_BLOCKDEV).values()
    assert dev.device == "" and dev.key == "/machine/peripheral/vd1/virtio-backend"
    assert dev.node_name == "bd0" and dev.writable and dev.image == BlockImage("/srv/lab/bd.img", "raw", 32 << 20)


def test_block_jobs() -> None:
    [copying] = map(BlockJob.from_qmp, json.loads(MIRROR_COPYING))
    assert copying == BlockJob(id="kvmshell-mirror-0", type="mirror", status=BlockJobStatus.RUNNING, ready=False,
                               busy=False, paused=False, offset=16 << 20, length=32 << 20, speed=4 << 20)
    [ready] = map(BlockJob.from_qmp, json.loads(MIRROR_READY))
    assert ready.ready and ready.status is BlockJobStatus.READY and ready.offset == ready.length == 16 << 20
    assert ready.speed == 0 and ready.io_status == "ok" and ready.error is None
    later = BlockJob.from_qmp({"device": "j", "status": "some-new-state", "error": "Input/output error"})
    assert later.status is BlockJobStatus.UNKNOWN and later.error == "Input/output error"


def test_nbd_server_addresses() -> None:
    unix = NbdServer(path="/run/kvmshell-nbd-x/nbd.sock")
    assert str(unix) == "unix:/run/kvmshell-nbd-x/nbd.sock"
    assert unix.uri("kvmshell-0") == "nbd+unix:///kvmshell-0?socket=/run/kvmshell-nbd-x/nbd.sock"
    tcp = NbdServer(host="10.0.0.2", port=10809)
    assert str(tcp) == "tcp:10.0.0.2:10809" and tcp.uri("kvmshell-1") == "nbd://10.0.0.2:10809/kvmshell-1"
    assert NbdServer(host="::1", port=10809).uri("e") == "nbd://[::1]:10809/e"
