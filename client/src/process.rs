//! What `/proc` says about a process: who it is and what it costs.
//!
//! A pid alone names nothing for long: the kernel hands it to the next
//! process once the old one is reaped. A heartbeat record therefore carries
//! the process's start time in clock ticks since boot (field 22 of
//! `/proc/<pid>/stat`) and the kernel's boot id; together with the pid they
//! name exactly one process that ever ran on this machine. The reaper only
//! signals a pid while `/proc` still shows that identity, and signals it
//! through a pidfd opened before the check, so the pid cannot be recycled
//! between the check and the signal.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Exactly one process of this machine's current boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
}

/// The fields of `/proc/<pid>/stat` this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    state: char,
    /// User plus system time, in clock ticks.
    cpu_ticks: u64,
    start_ticks: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses
/// and may itself hold spaces and `)`, so fields are counted after the last
/// `)`.
fn parse_stat(raw: &str) -> Option<Stat> {
    let (_, rest) = raw.rsplit_once(')')?;
    // rest = " S ppid pgrp …": field 3 is index 0 here.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).copied();
    let state = field(3)?.chars().next()?;
    let utime: u64 = field(14)?.parse().ok()?;
    let stime: u64 = field(15)?.parse().ok()?;
    let start_ticks = field(22)?.parse().ok()?;
    Some(Stat {
        state,
        cpu_ticks: utime.saturating_add(stime),
        start_ticks,
    })
}

fn read_stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The identity of `pid` now; `None` when no such process runs (or it is a
/// zombie, which has already exited).
pub fn identity(pid: u32) -> Option<ProcessIdentity> {
    let stat = read_stat(pid)?;
    if matches!(stat.state, 'Z' | 'X') {
        return None;
    }
    Some(ProcessIdentity {
        pid,
        start_ticks: stat.start_ticks,
    })
}

/// Whether `identity` still runs: same pid, same start time, not a zombie.
pub fn is_running(identity: ProcessIdentity) -> bool {
    self::identity(identity.pid) == Some(identity)
}

/// The kernel's boot id (`/proc/sys/kernel/random/boot_id`): a start tick
/// count means something only within one boot.
pub fn host_boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// When the machine booted, in Unix seconds (`btime` of `/proc/stat`).
fn boot_time_unix() -> Option<u64> {
    let raw = std::fs::read_to_string("/proc/stat").ok()?;
    raw.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// When a process with these start ticks started, in Unix seconds.
pub fn started_at_unix(start_ticks: u64) -> Option<f64> {
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Some(boot_time_unix()? as f64 + start_ticks as f64 / hz)
}

/// Resident memory of `pid` in bytes (`/proc/<pid>/statm`, field 2).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let raw = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = raw.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(rustix::param::page_size() as u64))
}

/// Bytes received and sent over every interface of `pid`'s network
/// namespace (`/proc/<pid>/net/dev`), as the legacy heartbeat service
/// reported them.
pub fn net_bytes(pid: u32) -> Option<(u64, u64)> {
    let raw = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
    let mut rx = 0u64;
    let mut tx = 0u64;
    for line in raw.lines().skip(2) {
        let Some((_, counters)) = line.split_once(':') else {
            continue;
        };
        let fields: Vec<&str> = counters.split_whitespace().collect();
        if fields.len() >= 16 {
            rx = rx.saturating_add(fields[0].parse().unwrap_or(0));
            tx = tx.saturating_add(fields[8].parse().unwrap_or(0));
        }
    }
    Some((rx, tx))
}

/// CPU use of one process between two looks, in percent of one core (as
/// `top` and the legacy service's `pidusage` report it).
#[derive(Debug)]
pub struct CpuSampler {
    identity: ProcessIdentity,
    last: Option<(Instant, u64)>,
}

impl CpuSampler {
    pub fn new(identity: ProcessIdentity) -> Self {
        Self {
            identity,
            last: None,
        }
    }

    /// Percent of one core used since the previous call (or since the
    /// process started, on the first). `None` once the process is gone.
    pub fn sample(&mut self) -> Option<f64> {
        let stat = read_stat(self.identity.pid)?;
        if stat.start_ticks != self.identity.start_ticks {
            return None;
        }
        let hz = rustix::param::clock_ticks_per_second() as f64;
        let now = Instant::now();
        let percent = match self.last {
            Some((at, ticks)) => {
                let secs = now.duration_since(at).as_secs_f64();
                if secs <= 0.0 {
                    0.0
                } else {
                    stat.cpu_ticks.saturating_sub(ticks) as f64 / hz / secs * 100.0
                }
            }
            None => {
                let lived = started_at_unix(stat.start_ticks)
                    .map(|s| unix_now() - s)
                    .unwrap_or(0.0);
                if lived <= 0.0 {
                    0.0
                } else {
                    stat.cpu_ticks as f64 / hz / lived * 100.0
                }
            }
        };
        self.last = Some((now, stat.cpu_ticks));
        Some((percent * 10.0).round() / 10.0)
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Why a process was not signalled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignalError {
    #[error("pid {0} is not a process that may be signalled (pid 1, or this process)")]
    Protected(u32),
    #[error("pid {0} no longer runs the process the record describes")]
    NotTheSameProcess(u32),
    #[error("signalling pid {pid}: {errno}")]
    Os { pid: u32, errno: rustix::io::Errno },
}

/// What may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    Term,
    Kill,
}

/// A process held by a pidfd, opened only if it is still the process the
/// record describes.
///
/// The pidfd is opened first and the identity checked after: from then on
/// the fd refers to the process that was checked even if it exits and its
/// pid is reused, so no signal sent through it can reach a newcomer. Pid 1
/// and this process are never opened. The fd turns readable when the
/// process exits.
#[derive(Debug)]
pub struct Target {
    pid: u32,
    fd: OwnedFd,
}

impl Target {
    pub fn open(identity: ProcessIdentity) -> Result<Self, SignalError> {
        let pid = identity.pid;
        if pid <= 1 || pid == std::process::id() {
            return Err(SignalError::Protected(pid));
        }
        let raw = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or(SignalError::NotTheSameProcess(pid))?;
        let fd = match rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::SRCH) => return Err(SignalError::NotTheSameProcess(pid)),
            Err(errno) => return Err(SignalError::Os { pid, errno }),
        };
        if !is_running(identity) {
            return Err(SignalError::NotTheSameProcess(pid));
        }
        Ok(Self { pid, fd })
    }

    pub fn signal(&self, sig: Sig) -> Result<(), SignalError> {
        let signal = match sig {
            Sig::Term => rustix::process::Signal::TERM,
            Sig::Kill => rustix::process::Signal::KILL,
        };
        match rustix::process::pidfd_send_signal(&self.fd, signal) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::SRCH) => Err(SignalError::NotTheSameProcess(self.pid)),
            Err(errno) => Err(SignalError::Os {
                pid: self.pid,
                errno,
            }),
        }
    }
}

impl AsFd for Target {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_after_a_command_name_with_spaces_and_parens() {
        let raw = "4242 (a b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 98765 1000 10 18446744073709551615";
        let stat = parse_stat(raw).unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.cpu_ticks, 10);
        assert_eq!(stat.start_ticks, 98765);
    }

    #[test]
    fn this_process_has_an_identity_and_a_stranger_start_time_does_not_match() {
        let me = identity(std::process::id()).unwrap();
        assert!(is_running(me));
        let other = ProcessIdentity {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        assert!(!is_running(other));
        assert!(rss_bytes(me.pid).unwrap() > 0);
        assert!(started_at_unix(me.start_ticks).unwrap() <= unix_now() + 1.0);
        assert!(host_boot_id().is_some());
    }

    #[test]
    fn never_opens_pid_1_or_itself_or_a_changed_process() {
        let me = identity(std::process::id()).unwrap();
        assert_eq!(
            Target::open(me).unwrap_err(),
            SignalError::Protected(me.pid)
        );
        let init = ProcessIdentity {
            pid: 1,
            start_ticks: 0,
        };
        assert_eq!(Target::open(init).unwrap_err(), SignalError::Protected(1));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let real = identity(child.id()).unwrap();
        let forged = ProcessIdentity {
            start_ticks: real.start_ticks + 1,
            ..real
        };
        assert_eq!(
            Target::open(forged).unwrap_err(),
            SignalError::NotTheSameProcess(real.pid)
        );
        assert!(is_running(real), "a forged identity must not be signalled");
        let target = Target::open(real).unwrap();
        target.signal(Sig::Kill).unwrap();
        child.wait().unwrap();
        assert!(!is_running(real));
        // Reaped: the fd still names the dead process, not a newcomer.
        assert_eq!(
            target.signal(Sig::Kill),
            Err(SignalError::NotTheSameProcess(real.pid))
        );
    }
}
