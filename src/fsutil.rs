//! Small filesystem helpers shared by every command that writes results.

use std::path::Path;

use anyhow::Context;

/// Writes `bytes` to `path` through a temporary file and a rename, so readers (and a resumed
/// run after a crash) never see a half-written file. The data reaches the disk before the
/// rename, and the rename before this returns: after a node fails, the file is the old one or
/// the new one, never an empty one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::io::Write::write_all(&mut file, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    file.sync_all().with_context(|| format!("cannot flush {} to disk", tmp.display()))?;
    rename_durable(&tmp, path)
}

/// Renames `from` to `to` (a file, or a folder whose files are on disk already, see
/// [`sync_folder`]) and flushes the parent folder, so the new name survives a crash.
pub fn rename_durable(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::rename(from, to).with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))?;
    sync_folder_entry(to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
}

/// Flushes every file directly in `dir`, and `dir`'s own entries, to disk: a folder written in
/// place (a checkpoint before its rename) is then whole on disk.
pub fn sync_folder(dir: &Path) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = e?.path();
        if path.is_file() {
            std::fs::File::open(&path).and_then(|f| f.sync_all()).with_context(|| format!("cannot flush {} to disk", path.display()))?;
        }
    }
    sync_folder_entry(dir)
}

/// Flushes a folder's entries (names created, renamed or removed in it).
fn sync_folder_entry(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("cannot flush folder {} to disk", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_and_durable_renames_leave_only_the_final_names() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("state.json");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        let tmp = d.path().join(".tmp-step-1");
        std::fs::create_dir(&tmp).unwrap();
        write_atomic(&tmp.join("a"), b"a").unwrap();
        sync_folder(&tmp).unwrap();
        rename_durable(&tmp, &d.path().join("step-1")).unwrap();
        let mut names: Vec<String> =
            std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, ["state.json", "step-1"]);
        assert_eq!(std::fs::read(d.path().join("step-1/a")).unwrap(), b"a");
        // A missing source is one error naming both paths.
        let e = format!("{:#}", rename_durable(&tmp, &d.path().join("x")).unwrap_err());
        assert!(e.contains(".tmp-step-1") && e.contains("x"), "{e}");
    }
}
