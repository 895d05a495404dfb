//! A VM's serial console log, as the worker's drivers leave it in the VM's run directory.

use std::path::Path;

/// The tail of a VM's console log on this node, at most `max` bytes.
pub(crate) fn console_tail(run_root: &Path, name: &str, max: u64) -> Result<Vec<u8>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let path = blx_vmm::console_log_path(run_root, name);
    let mut file = std::fs::File::open(&path)
        .map_err(|e| format!("no console log for {name} on this node: {e}"))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    file.seek(SeekFrom::Start(len.saturating_sub(max)))
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    file.take(max)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    Ok(out)
}
