//! A server's data directory on a [`LazyFs`] mount, and power cuts of it.

use std::path::Path;

use super::{LazyFs, Mounted};
use crate::common::{Server, TempDir};

/// Whether FUSE mounts work here (root and /dev/fuse); says so if not.
pub fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/dev/fuse").exists() {
        eprintln!("power-cut tests need root and /dev/fuse; not run here");
        return false;
    }
    true
}

/// A server's data directory on a lazy file system.
pub struct Rig {
    /// What each start printed, for a failure's message.
    pub log: String,
    pub fs: LazyFs,
    mount: Option<Mounted>,
    dir: TempDir,
}

impl Rig {
    pub fn new(tag: &str) -> Rig {
        let dir = TempDir::new(tag);
        let at = dir.path().join("mnt");
        std::fs::create_dir_all(&at).unwrap();
        let fs = LazyFs::new();
        let mount = fs.mount(&at).expect("mount the FUSE file system");
        Rig {
            log: String::new(),
            fs,
            mount: Some(mount),
            dir,
        }
    }

    pub fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt").join("data")
    }

    /// Kills the server, unmounts, cuts the power, mounts again.
    pub fn cut(&mut self, server: Server) {
        server.kill();
        drop(self.mount.take());
        self.fs.power_cut();
        self.mount = Some(
            self.fs
                .mount(&self.dir.path().join("mnt"))
                .expect("mount again"),
        );
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        drop(self.mount.take());
    }
}
