//! TUN devices from `/dev/net/tun`. The crate's only unsafe code lives here: the `TUNSETIFF`
//! ioctl, and registering the device's file with tokio's reactor.
//!
//! Devices are created non-persistent, so the kernel removes them when their file is closed,
//! even if the process dies. `IFF_TUN_EXCL` makes creation fail instead of attaching to a device
//! someone else already has.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use tokio::io::unix::AsyncFd;

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_TUN_EXCL: libc::c_short = -0x8000; // 0x8000 as a C short

/// `struct ifreq` as TUNSETIFF reads it: the name, the flags, padding to the union's size.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates the layer-3 TUN device `name` (no packet-info header) and returns its file,
/// opened non-blocking.
pub fn create(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} must be 1 to 15 bytes"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI | IFF_TUN_EXCL,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    #[expect(unsafe_code, reason = "TUNSETIFF has no safe wrapper in std")]
    // SAFETY: `file` is an open /dev/net/tun descriptor and `req` is a live, properly laid out
    // `struct ifreq` that the kernel reads and writes only within its size.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Registers a device's file with the current tokio reactor.
pub fn register(file: File) -> io::Result<AsyncFd<File>> {
    #[expect(
        unsafe_code,
        reason = "tokio's AsyncFd::register is unsafe since 1.5x (I/O safety)"
    )]
    // SAFETY: a `File` owns its descriptor: it stays open and the same until the `AsyncFd` (which
    // owns the `File`) is dropped, and `as_raw_fd` always returns it.
    let registered = unsafe { AsyncFd::register(file) };
    registered.map_err(io::Error::from)
}
