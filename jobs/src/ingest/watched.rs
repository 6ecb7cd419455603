//! Watched directories: the operator maps a directory (`CONVEYOR_WATCH_ROOT`) holding one
//! directory per tenant (`<root>/<tenant id>/`); an ingest source `{"directory": "docs"}` reads
//! every file of a known format under `<root>/<tenant id>/docs`. Never a path outside the
//! tenant's own directory: `..` is refused at submit, the resolved path must still be inside
//! it, and symbolic links are not followed. The tenant may change its directory while a sync
//! runs, so every directory and file is opened first (never following a link at its end) and
//! then checked by where the open descriptor really is: a path swapped for a link after it was
//! listed leads nowhere else.

use contracts::ingest::DocFormat;
use shared::datasets::Compression;
use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
};
use uuid::Uuid;

/// One file of a watched directory.
#[derive(Debug)]
pub struct WatchedFile {
    pub path: PathBuf,
    /// The tenant's directory, which the file must still be in when it is opened.
    pub beneath: PathBuf,
    /// Its path from the tenant's directory, `/`-separated: the document's id.
    pub id: String,
    pub format: DocFormat,
    pub compression: Compression,
}

/// The directory as its documents name it (`docs/handbook`, `` for the tenant's root), and its
/// files of known formats, in path order; at most `max` of them.
pub fn list(
    root: Option<&Path>,
    tenant: Uuid,
    directory: &str,
    max: usize,
) -> Result<(String, Vec<WatchedFile>), String> {
    let root = root.ok_or("this deployment maps no watched directories (CONVEYOR_WATCH_ROOT)")?;
    let tenant_root = root
        .join(tenant.to_string())
        .canonicalize()
        .map_err(|_| "the tenant has no watched directory on this deployment".to_owned())?;
    let dir = tenant_root
        .join(directory)
        .canonicalize()
        .map_err(|_| format!("no directory {directory:?} among the tenant's watched ones"))?;
    // `canonicalize` resolved any link: what it points to must still be the tenant's.
    let relative = dir
        .strip_prefix(&tenant_root)
        .map_err(|_| format!("{directory:?} leads outside the tenant's watched directory"))?;
    if !dir.is_dir() {
        return Err(format!("{directory:?} is not a directory"));
    }
    let mut files = Vec::new();
    let mut pending = vec![dir.clone()];
    while let Some(at) = pending.pop() {
        let reading = |e: io::Error| format!("reading {directory:?}: {e}");
        let opened = open_beneath(&at, &tenant_root, libc::O_DIRECTORY).map_err(reading)?;
        // Listed through the descriptor: the directory checked, whatever its path is now.
        let entries = std::fs::read_dir(fd_path(&opened)).map_err(reading)?;
        for entry in entries {
            let entry = entry.map_err(reading)?;
            // The entry's own type: a link is neither a file nor a directory here.
            let kind = entry.file_type().map_err(reading)?;
            let path = at.join(entry.file_name());
            if kind.is_dir() {
                pending.push(path);
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(format) = kind
                .is_file()
                .then(|| DocFormat::from_name(&name))
                .flatten()
            else {
                continue;
            };
            let id = path
                .strip_prefix(&tenant_root)
                .expect("under the tenant's directory")
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            let compression = match name.rsplit_once('.').map(|(_, ext)| ext) {
                Some("gz") => Compression::Gzip,
                Some("zst") => Compression::Zstd,
                _ => Compression::None,
            };
            files.push(WatchedFile {
                path,
                beneath: tenant_root.clone(),
                id,
                format,
                compression,
            });
            if files.len() > max {
                return Err(format!("{directory:?} holds more than {max} files"));
            }
        }
    }
    files.sort_by(|a, b| a.id.cmp(&b.id));
    let name = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/");
    Ok((name, files))
}

impl WatchedFile {
    /// The file, opened only if it is still a regular file in the tenant's directory.
    pub fn open(path: &Path, beneath: &Path) -> io::Result<File> {
        use std::os::unix::fs::MetadataExt;
        let file = open_beneath(path, beneath, 0)?;
        let metadata = file.metadata()?;
        if !metadata.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is no longer a regular file",
            ));
        }
        // A hard link is a path of its own to a file that may be another tenant's.
        if metadata.nlink() > 1 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "it has other hard links, which may lead outside the tenant's directory",
            ));
        }
        Ok(file)
    }
}

/// Opens `path` for reading without following a link at its end (nor blocking on a FIFO),
/// then checks that what was opened lies in `beneath`: a link or a directory swapped in
/// anywhere along the path leads somewhere else, which the descriptor's own path shows.
fn open_beneath(path: &Path, beneath: &Path, flags: i32) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | flags)
        .open(path)?;
    let real = std::fs::read_link(fd_path(&file))?;
    if real.strip_prefix(beneath).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "it leads outside the tenant's watched directory",
        ));
    }
    Ok(file)
}

/// The path of an open descriptor, which names what it opened whatever has moved since.
fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files of known formats in subdirectories too; links, unknown extensions and paths out
    /// of the tenant's directory are not read.
    #[test]
    fn a_directory_lists_its_files_and_never_leaves_the_tenants() {
        let root = std::env::temp_dir().join(format!("watch-{}", Uuid::now_v7()));
        let tenant = Uuid::now_v7();
        let docs = root.join(tenant.to_string()).join("docs");
        std::fs::create_dir_all(docs.join("sub")).unwrap();
        std::fs::write(docs.join("a.md"), "a").unwrap();
        std::fs::write(docs.join("sub/b.txt.gz"), "b").unwrap();
        std::fs::write(docs.join("c.docx"), "c").unwrap();
        let other = root.join(Uuid::now_v7().to_string());
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("secret.md"), "theirs").unwrap();
        std::os::unix::fs::symlink(other.join("secret.md"), docs.join("link.md")).unwrap();
        std::os::unix::fs::symlink(&other, root.join(tenant.to_string()).join("theirs")).unwrap();

        let (name, files) = list(Some(&root), tenant, "./docs/", 100).unwrap();
        assert_eq!(name, "docs");
        let ids: Vec<&str> = files.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, ["docs/a.md", "docs/sub/b.txt.gz"]);
        assert_eq!(files[1].compression, Compression::Gzip);
        assert_eq!(files[1].format, DocFormat::Text);

        let outside = list(Some(&root), tenant, "theirs", 100).unwrap_err();
        assert!(outside.contains("outside"), "{outside}");
        assert!(list(Some(&root), tenant, "../", 100).is_err());
        assert!(list(Some(&root), tenant, "nope", 100).is_err());
        assert!(list(None, tenant, "docs", 100).is_err());
        assert!(list(Some(&root), tenant, "docs", 1)
            .unwrap_err()
            .contains("more than 1"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// The tenant changes its directory while a sync runs: a listed file swapped for a link
    /// to another tenant's file, or a listed directory swapped for a link to another tenant's
    /// directory, is refused when it is opened (both were read through the link).
    #[test]
    fn a_path_swapped_for_a_link_after_its_listing_is_not_read() {
        let root = std::env::temp_dir().join(format!("watch-{}", Uuid::now_v7()));
        let tenant = Uuid::now_v7();
        let docs = root.join(tenant.to_string()).join("docs");
        std::fs::create_dir_all(docs.join("sub")).unwrap();
        std::fs::write(docs.join("a.md"), "mine").unwrap();
        std::fs::write(docs.join("sub/b.md"), "mine too").unwrap();
        let other = root.join(Uuid::now_v7().to_string());
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("b.md"), "theirs").unwrap();
        std::fs::write(other.join("secret.md"), "theirs").unwrap();

        let (_, files) = list(Some(&root), tenant, "docs", 100).unwrap();
        let read = |f: &WatchedFile| {
            WatchedFile::open(&f.path, &f.beneath)
                .and_then(|mut file| std::io::read_to_string(&mut file))
        };
        assert_eq!(read(&files[0]).unwrap(), "mine");

        std::fs::remove_file(docs.join("a.md")).unwrap();
        std::os::unix::fs::symlink(other.join("secret.md"), docs.join("a.md")).unwrap();
        assert!(read(&files[0]).is_err(), "{:?}", read(&files[0]));
        std::fs::remove_dir_all(docs.join("sub")).unwrap();
        std::os::unix::fs::symlink(&other, docs.join("sub")).unwrap();
        assert!(read(&files[1]).is_err(), "{:?}", read(&files[1]));
        // A hard link in the tenant's directory to another tenant's file.
        std::fs::hard_link(other.join("b.md"), docs.join("c.md")).unwrap();
        let (_, files) = list(Some(&root), tenant, "docs", 100).unwrap();
        let linked = files.iter().find(|f| f.id == "docs/c.md").unwrap();
        assert!(read(linked).is_err(), "{:?}", read(linked));
        // A directory swapped for a link while the listing goes down to it.
        let tenant_root = root.join(tenant.to_string()).canonicalize().unwrap();
        let sub = tenant_root.join("docs/sub");
        assert!(open_beneath(&sub, &tenant_root, libc::O_DIRECTORY).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
