//! Restarting units through systemd's D-Bus API (`apply`, `revert`).
//!
//! D-Bus rather than `systemctl`: the job's result comes back as data
//! (`JobRemoved` with "done", "failed", "timeout", "dependency", ...) instead
//! of an exit code and text to parse, and the unit's state on failure is read
//! the same way. A trait keeps the orchestration testable without systemd.

use std::sync::mpsc;
use std::time::Duration;
use zbus::zvariant::OwnedObjectPath;

const DEST: &str = "org.freedesktop.systemd1";
const PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const UNIT: &str = "org.freedesktop.systemd1.Unit";

#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("cannot reach systemd on the system bus: {0} (is this a systemd host? use --no-restart and restart the units yourself)")]
    Bus(String),
    #[error("restart of {unit} ended with \"{result}\"; the unit is {state}: see `journalctl -u {unit}`")]
    JobFailed {
        unit: String,
        result: String,
        state: String,
    },
    #[error("restart of {unit} did not finish within {secs} s; the unit is {state}")]
    Timeout {
        unit: String,
        secs: u64,
        state: String,
    },
}

pub trait UnitControl {
    /// Restart `unit` and wait until systemd reports the job's result.
    fn restart(&self, unit: &str, timeout: Duration) -> Result<(), UnitError>;
    /// `active/running`, `failed/failed (exit-code)`, ... for messages.
    fn describe(&self, unit: &str) -> String;
}

pub struct Dbus {
    conn: zbus::blocking::Connection,
}

impl Dbus {
    pub fn system() -> Result<Dbus, UnitError> {
        zbus::blocking::Connection::system()
            .map(|conn| Dbus { conn })
            .map_err(|e| UnitError::Bus(e.to_string()))
    }

    fn manager(&self) -> Result<zbus::blocking::Proxy<'_>, UnitError> {
        zbus::blocking::Proxy::new(&self.conn, DEST, PATH, MANAGER)
            .map_err(|e| UnitError::Bus(e.to_string()))
    }
}

impl UnitControl for Dbus {
    fn restart(&self, unit: &str, timeout: Duration) -> Result<(), UnitError> {
        let bus = |e: zbus::Error| UnitError::Bus(e.to_string());
        let mgr = self.manager()?;
        // Signals are only sent to subscribers; an "already subscribed"
        // error is fine.
        let _: Result<(), _> = mgr.call("Subscribe", &());
        // Listen before asking, so the job's end cannot be missed.
        let signals = mgr.receive_signal("JobRemoved").map_err(bus)?;
        let job: OwnedObjectPath = mgr.call("RestartUnit", &(unit, "replace")).map_err(bus)?;
        let (tx, rx) = mpsc::channel();
        let job_path = job.to_string();
        std::thread::spawn(move || {
            for msg in signals {
                if let Ok((_, path, _, result)) = msg
                    .body()
                    .deserialize::<(u32, OwnedObjectPath, String, String)>()
                {
                    if path.as_str() == job_path {
                        let _ = tx.send(result);
                        return;
                    }
                }
            }
        });
        match rx.recv_timeout(timeout) {
            Ok(r) if r == "done" => Ok(()),
            Ok(result) => Err(UnitError::JobFailed {
                unit: unit.into(),
                result,
                state: self.describe(unit),
            }),
            Err(_) => Err(UnitError::Timeout {
                unit: unit.into(),
                secs: timeout.as_secs(),
                state: self.describe(unit),
            }),
        }
    }

    fn describe(&self, unit: &str) -> String {
        let get = || -> Result<String, zbus::Error> {
            let mgr = self
                .manager()
                .map_err(|e| zbus::Error::Failure(e.to_string()))?;
            let path: OwnedObjectPath = mgr.call("LoadUnit", &(unit,))?;
            let u = zbus::blocking::Proxy::new(&self.conn, DEST, path, UNIT)?;
            let active: String = u.get_property("ActiveState")?;
            let sub: String = u.get_property("SubState")?;
            Ok(format!("{active}/{sub}"))
        };
        get().unwrap_or_else(|e| format!("unknown ({e})"))
    }
}

#[cfg(test)]
pub mod fake {
    use super::*;
    use std::cell::RefCell;

    /// Records restarts; units named in `failing` fail with "failed".
    #[derive(Default)]
    pub struct FakeUnits {
        pub restarted: RefCell<Vec<String>>,
        pub failing: Vec<String>,
    }

    impl UnitControl for FakeUnits {
        fn restart(&self, unit: &str, _timeout: Duration) -> Result<(), UnitError> {
            self.restarted.borrow_mut().push(unit.to_string());
            if self.failing.iter().any(|u| u == unit) {
                return Err(UnitError::JobFailed {
                    unit: unit.into(),
                    result: "failed".into(),
                    state: self.describe(unit),
                });
            }
            Ok(())
        }

        fn describe(&self, _unit: &str) -> String {
            "failed/failed".into()
        }
    }
}
