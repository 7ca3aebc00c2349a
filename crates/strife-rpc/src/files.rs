//! Everything a Strife process writes under its directory is private to the
//! user that runs it: directories 0700, files 0600, whatever the umask it
//! was started with. Databases hold balances and tokens, logs hold user
//! names and payment ids, and the key files are secrets.

use nix::sys::stat::{Mode, umask};
use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// The mode of every directory Strife creates.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file Strife creates.
pub const FILE_MODE: u32 = 0o600;
/// The umask every `strife` process runs with: no bits for group or others.
pub const PRIVATE_UMASK: u32 = 0o077;

/// Sets the process umask to [`PRIVATE_UMASK`], so that whatever this
/// process and its children create (SQLite's `-wal` and `-shm` files
/// included) is private. Call it first thing in `main`, before any thread.
pub fn restrict_umask() {
    umask(Mode::from_bits_truncate(PRIVATE_UMASK));
}

/// `create_dir_all` that makes every missing directory 0700. Directories
/// that exist are left as they are.
pub fn create_private_dir_all(path: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(path)
}

/// Opens `path` for appending, creating it 0600 if it is missing (a
/// database is created this way before SQLite opens it, so that SQLite
/// gives its `-wal` and `-shm` files the same mode).
pub fn open_private_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(FILE_MODE).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn directories_and_files_are_private_even_under_a_permissive_umask() {
        let root = std::env::temp_dir().join(format!("strife-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let deep = root.join("a").join("b");
        // The process umask is left alone (tests share the process): the
        // explicit modes alone must give 0700 and 0600.
        create_private_dir_all(&deep).expect("dirs");
        open_private_append(&deep.join("f.db")).expect("file");
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&root), DIR_MODE);
        assert_eq!(mode(&root.join("a")), DIR_MODE);
        assert_eq!(mode(&deep), DIR_MODE);
        assert_eq!(mode(&deep.join("f.db")), FILE_MODE);
        create_private_dir_all(&deep).expect("existing directories are fine");
        let _ = std::fs::remove_dir_all(&root);
    }
}
