//! A FUSE file system that forgets what was not made durable, for power-cut
//! tests (the idea of Jepsen's LazyFS). Every file's bytes and every
//! directory's entries live in memory twice: as written, and as of the last
//! `fsync`/`fdatasync` of that file (for a directory, of the directory:
//! creates, renames and deletes). [`LazyFs::power_cut`] throws away
//! everything not durable. Files are opened with direct I/O, so no page
//! cache stands between the server and this model; the test unmounts
//! before a cut and mounts again after it.

#![allow(dead_code)]

pub mod rig;

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

const TTL: Duration = Duration::ZERO;

enum Node {
    File {
        data: Vec<u8>,
        durable: Vec<u8>,
        mtime: SystemTime,
    },
    Dir {
        entries: BTreeMap<OsString, u64>,
        durable: BTreeMap<OsString, u64>,
    },
}

struct Model {
    nodes: HashMap<u64, Node>,
    next: u64,
    /// fsyncs and fdatasyncs of files, and of directories.
    file_syncs: u64,
    dir_syncs: u64,
}

/// The file system's state, shared by every mount of it.
#[derive(Clone)]
pub struct LazyFs(Arc<Mutex<Model>>);

/// A mounted [`LazyFs`]; dropping it unmounts.
pub struct Mounted {
    session: Option<BackgroundSession>,
    /// Where it is mounted.
    pub path: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

impl LazyFs {
    /// An empty file system (its root directory durable).
    pub fn new() -> LazyFs {
        let mut nodes = HashMap::new();
        nodes.insert(
            INodeNo::ROOT.0,
            Node::Dir {
                entries: BTreeMap::new(),
                durable: BTreeMap::new(),
            },
        );
        LazyFs(Arc::new(Mutex::new(Model {
            nodes,
            next: 2,
            file_syncs: 0,
            dir_syncs: 0,
        })))
    }

    fn model(&self) -> MutexGuard<'_, Model> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mounts it at `path` (which must exist); needs root and /dev/fuse.
    pub fn mount(&self, path: &Path) -> std::io::Result<Mounted> {
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("lazyfs".into())];
        let session = fuser::spawn_mount(self.clone(), path, &config)?;
        Ok(Mounted {
            session: Some(session),
            path: path.to_path_buf(),
        })
    }

    /// A power cut: every file and directory goes back to its durable state.
    pub fn power_cut(&self) {
        for node in self.model().nodes.values_mut() {
            match node {
                Node::File { data, durable, .. } => *data = durable.clone(),
                Node::Dir { entries, durable } => *entries = durable.clone(),
            }
        }
    }

    /// fsyncs of files and of directories seen so far.
    pub fn syncs(&self) -> (u64, u64) {
        let m = self.model();
        (m.file_syncs, m.dir_syncs)
    }
}

impl LazyFs {
    /// An fsync of a file or a directory: what it holds now is durable.
    fn make_durable(&self, ino: INodeNo, dir: bool, reply: ReplyEmpty) {
        let mut m = self.model();
        if dir {
            m.dir_syncs += 1;
        } else {
            m.file_syncs += 1;
        }
        match m.nodes.get_mut(&ino.0) {
            Some(Node::File { data, durable, .. }) => durable.clone_from(data),
            Some(Node::Dir { entries, durable }) => durable.clone_from(entries),
            None => return reply.error(Errno::ENOENT),
        }
        reply.ok();
    }
}

fn attr(ino: u64, node: &Node) -> FileAttr {
    let (kind, size, perm, mtime) = match node {
        Node::File { data, mtime, .. } => (FileType::RegularFile, data.len() as u64, 0o644, *mtime),
        Node::Dir { .. } => (FileType::Directory, 0, 0o755, SystemTime::UNIX_EPOCH),
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind,
        perm,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Model {
    fn dir(&mut self, ino: INodeNo) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.nodes.get_mut(&ino.0) {
            Some(Node::Dir { entries, .. }) => Ok(entries),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn add(&mut self, parent: INodeNo, name: &OsStr, node: Node) -> Result<FileAttr, Errno> {
        let ino = self.next;
        let entries = self.dir(parent)?;
        if entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        entries.insert(name.to_os_string(), ino);
        self.next += 1;
        let a = attr(ino, &node);
        self.nodes.insert(ino, node);
        Ok(a)
    }
}

impl Filesystem for LazyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut m = self.model();
        let found = m.dir(parent).map(|e| e.get(name).copied());
        match found {
            Ok(Some(ino)) => reply.entry(&TTL, &attr(ino, &m.nodes[&ino]), Generation(0)),
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.model().nodes.get(&ino.0) {
            Some(n) => reply.attr(&TTL, &attr(ino.0, n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut m = self.model();
        let Some(node) = m.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if let Node::File { data, mtime: t, .. } = node {
            if let Some(size) = size {
                data.resize(size as usize, 0);
                *t = SystemTime::now();
            }
            match mtime {
                Some(TimeOrNow::SpecificTime(s)) => *t = s,
                Some(TimeOrNow::Now) => *t = SystemTime::now(),
                None => {}
            }
        }
        reply.attr(&TTL, &attr(ino.0, node));
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let node = Node::Dir {
            entries: BTreeMap::new(),
            durable: BTreeMap::new(),
        };
        match self.model().add(parent, name, node) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let node = Node::File {
            data: Vec::new(),
            durable: Vec::new(),
            mtime: SystemTime::now(),
        };
        match self.model().add(parent, name, node) {
            Ok(a) => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut m = self.model();
        match m.nodes.get_mut(&ino.0) {
            Some(Node::File { data, mtime, .. }) => {
                if flags.0 & libc::O_TRUNC != 0 {
                    data.clear();
                    *mtime = SystemTime::now();
                }
                reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
            }
            Some(Node::Dir { .. }) => reply.opened(FileHandle(0), FopenFlags::empty()),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.model().nodes.get(&ino.0) {
            Some(Node::File { data, .. }) => {
                let from = (offset as usize).min(data.len());
                let to = (from + size as usize).min(data.len());
                reply.data(&data[from..to]);
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        bytes: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.model().nodes.get_mut(&ino.0) {
            Some(Node::File { data, mtime, .. }) => {
                let end = offset as usize + bytes.len();
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[offset as usize..end].copy_from_slice(bytes);
                *mtime = SystemTime::now();
                reply.written(bytes.len() as u32);
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.make_durable(ino, false, reply);
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.make_durable(ino, true, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.model().dir(parent).map(|e| e.remove(name)) {
            Ok(Some(_)) => reply.ok(),
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.unlink(req, parent, name, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut m = self.model();
        let ino = match m.dir(parent).map(|e| e.get(name).copied()) {
            Ok(Some(ino)) => ino,
            Ok(None) => return reply.error(Errno::ENOENT),
            Err(e) => return reply.error(e),
        };
        match m.dir(newparent) {
            Ok(target) => {
                if flags.contains(RenameFlags::RENAME_NOREPLACE) && target.contains_key(newname) {
                    return reply.error(Errno::EEXIST);
                }
                target.insert(newname.to_os_string(), ino);
            }
            Err(e) => return reply.error(e),
        }
        if let Ok(e) = m.dir(parent) {
            if parent != newparent || name != newname {
                e.remove(name);
            }
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let m = self.model();
        let Some(Node::Dir { entries, .. }) = m.nodes.get(&ino.0) else {
            return reply.error(Errno::ENOTDIR);
        };
        let mut all: Vec<(u64, FileType, OsString)> = vec![
            (ino.0, FileType::Directory, ".".into()),
            (INodeNo::ROOT.0, FileType::Directory, "..".into()),
        ];
        for (name, &child) in entries {
            let kind = match m.nodes.get(&child) {
                Some(Node::Dir { .. }) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((child, kind, name.clone()));
        }
        for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        match self.model().nodes.get_mut(&ino.0) {
            Some(Node::File { data, .. }) => {
                let end = (offset + length) as usize;
                if data.len() < end {
                    data.resize(end, 0);
                }
                reply.ok();
            }
            _ => reply.error(Errno::ENOENT),
        }
    }
}
