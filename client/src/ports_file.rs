//! Writes the ports file ([`axion_wire::ports`]) for `--ports-file`.
//!
//! A reader waits for the file to appear and reads it once: the text goes
//! to a temporary file beside it, which is then renamed over the path, so
//! the file is either absent or whole. A file left by an earlier run is
//! removed at start ([`clear`]) and the file at a clean stop (dropping
//! [`PortsFile`]), so a reader never takes a dead run's ports for this
//! one's; a process that is killed leaves its file behind until the next
//! start.

use std::io;
use std::path::{Path, PathBuf};

use axion_wire::ports::Ports;

/// Removes the file an earlier run left at `path`, if any.
pub fn clear(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// A written ports file; dropping it removes the file.
#[derive(Debug)]
pub struct PortsFile {
    path: PathBuf,
}

impl PortsFile {
    /// Writes `ports` to `path` whole: a temporary file in the same
    /// directory (a rename is atomic only within one file system), then a
    /// rename over `path`.
    pub fn write(path: &Path, ports: &Ports) -> io::Result<Self> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".{}.tmp", std::process::id()));
        let temp = path.with_file_name(temp_name);
        std::fs::write(&temp, ports.render())?;
        if let Err(err) = std::fs::rename(&temp, path) {
            let _ = std::fs::remove_file(&temp);
            return Err(err);
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PortsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_appears_whole_and_goes_with_its_handle() {
        let dir = std::env::temp_dir().join(format!("axion-ports-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serve.ports");
        std::fs::write(&path, "mqtt=127.0.0.1:1\n").unwrap();
        clear(&path).unwrap();
        assert!(!path.exists(), "an earlier run's file is gone");
        clear(&path).unwrap();

        let mut ports = Ports::new();
        ports.insert(axion_wire::ports::MQTT, "127.0.0.1:41883".parse().unwrap());
        let written = PortsFile::write(&path, &ports).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(Ports::parse(&text), Ok(ports));
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["serve.ports"], "no temporary file left");
        drop(written);
        assert!(!path.exists());
        std::fs::remove_dir(&dir).unwrap();
    }
}
