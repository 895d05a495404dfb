//! Named guest images: a folder holding a kernel, an initramfs and an `image.json` that names
//! them, as built by `scripts/build-image.sh`.
//!
//! ```text
//! <images dir>/<name>/image.json   {"name":"default","kernel":"vmlinux","initrd":"initrd.img",
//!                                   "ready_marker":"BLX_READY","kernel_version":"6.1.0-..."}
//! <images dir>/<name>/vmlinux
//! <images dir>/<name>/initrd.img
//! ```
//!
//! Loading resolves the paths and checks that the files exist; it does not read them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The file in an image folder that describes it.
pub const MANIFEST: &str = "image.json";

/// A guest image resolved to paths on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// The image's name (its folder's name).
    pub name: String,
    /// Uncompressed kernel (PVH entry) or bzImage, absolute when the images folder is.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// The line the guest prints on its serial console once booted, if it prints one.
    pub ready_marker: Option<String>,
    /// The kernel's release, for information.
    pub kernel_version: Option<String>,
}

/// Why an image could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The name is not a plain folder name (`[a-z0-9-_.]`, no `..`).
    #[error("invalid image name {0:?}: use lowercase letters, digits, '-', '_' and '.'")]
    InvalidName(String),
    /// No manifest for that name.
    #[error("unknown image {name:?}: no {} (build it with scripts/build-image.sh)", .manifest.display())]
    Unknown {
        /// The name asked for.
        name: String,
        /// Where its manifest was looked for.
        manifest: PathBuf,
    },
    /// The manifest could not be read or parsed.
    #[error("image {name:?}: cannot read {}: {reason}", .manifest.display())]
    BadManifest {
        /// The image's name.
        name: String,
        /// The manifest's path.
        manifest: PathBuf,
        /// Why.
        reason: String,
    },
    /// The manifest names a file that is not there.
    #[error("image {name:?}: {what} {} is missing (rebuild it with scripts/build-image.sh)", .path.display())]
    MissingFile {
        /// The image's name.
        name: String,
        /// `kernel` or `initrd`.
        what: &'static str,
        /// The missing file.
        path: PathBuf,
    },
}

/// `image.json` as written by `scripts/build-image.sh`. Unknown fields are refused so that a
/// typo does not go unnoticed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    name: Option<String>,
    kernel: String,
    initrd: String,
    #[serde(default)]
    ready_marker: Option<String>,
    #[serde(default)]
    kernel_version: Option<String>,
}

/// Where images live unless configured otherwise: `$BLX_IMAGE_DIR`, else
/// `$HOME/.cache/blx/images` (`./.cache/blx/images` without a home).
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BLX_IMAGE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("blx").join("images")
}

/// Whether `name` may name an image folder: non-empty, `[a-z0-9-_.]`, no `..`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains("..")
        && name != "."
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

/// Loads image `name` from `images_dir`: reads `<images_dir>/<name>/image.json` and resolves
/// the kernel and initramfs relative to that folder (absolute paths are kept).
pub fn load(images_dir: &Path, name: &str) -> Result<Image, ImageError> {
    if !valid_name(name) {
        return Err(ImageError::InvalidName(name.to_owned()));
    }
    let folder = images_dir.join(name);
    let manifest_path = folder.join(MANIFEST);
    let text = match std::fs::read_to_string(&manifest_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ImageError::Unknown {
                name: name.to_owned(),
                manifest: manifest_path,
            });
        }
        Err(e) => {
            return Err(ImageError::BadManifest {
                name: name.to_owned(),
                manifest: manifest_path,
                reason: e.to_string(),
            });
        }
    };
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| ImageError::BadManifest {
        name: name.to_owned(),
        manifest: manifest_path.clone(),
        reason: e.to_string(),
    })?;
    if let Some(inner) = &manifest.name
        && inner != name
    {
        tracing::debug!(folder = name, manifest = %inner, "image folder and manifest name differ; the folder wins");
    }
    let resolve = |what: &'static str, file: &str| -> Result<PathBuf, ImageError> {
        let path = folder.join(file);
        if path.is_file() {
            Ok(path)
        } else {
            Err(ImageError::MissingFile {
                name: name.to_owned(),
                what,
                path,
            })
        }
    };
    Ok(Image {
        name: name.to_owned(),
        kernel: resolve("kernel", &manifest.kernel)?,
        initrd: resolve("initrd", &manifest.initrd)?,
        ready_marker: manifest.ready_marker.filter(|m| !m.is_empty()),
        kernel_version: manifest.kernel_version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_image(dir: &Path, name: &str, manifest: &str) {
        let folder = dir.join(name);
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("vmlinux"), b"kernel").unwrap();
        std::fs::write(folder.join("initrd.img"), b"initrd").unwrap();
        std::fs::write(folder.join(MANIFEST), manifest).unwrap();
    }

    #[test]
    fn loads_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        write_image(
            dir.path(),
            "default",
            r#"{"name":"default","kernel":"vmlinux","initrd":"initrd.img","ready_marker":"BLX_READY","kernel_version":"6.1"}"#,
        );
        let image = load(dir.path(), "default").unwrap();
        assert_eq!(image.kernel, dir.path().join("default/vmlinux"));
        assert_eq!(image.initrd, dir.path().join("default/initrd.img"));
        assert_eq!(image.ready_marker.as_deref(), Some("BLX_READY"));
        assert_eq!(image.kernel_version.as_deref(), Some("6.1"));
    }

    #[test]
    fn unknown_image_says_how_to_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path(), "foo").unwrap_err().to_string();
        let expected = format!(
            "unknown image \"foo\": no {}/foo/image.json (build it with scripts/build-image.sh)",
            dir.path().display()
        );
        assert_eq!(err, expected);
    }

    #[test]
    fn refuses_names_that_escape_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["..", "../x", "a/b", "", "A", "x..y", ".", "a b"] {
            assert!(
                matches!(load(dir.path(), name), Err(ImageError::InvalidName(_))),
                "{name:?} accepted"
            );
        }
        assert!(valid_name("debian-12_cloud.v2"));
    }

    #[test]
    fn missing_kernel_is_named() {
        let dir = tempfile::tempdir().unwrap();
        write_image(
            dir.path(),
            "x",
            r#"{"kernel":"nope","initrd":"initrd.img"}"#,
        );
        let err = load(dir.path(), "x").unwrap_err().to_string();
        assert!(err.contains("kernel") && err.contains("x/nope"), "{err}");
    }

    #[test]
    fn bad_manifest_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        write_image(
            dir.path(),
            "x",
            r#"{"kernel":"vmlinux","initrd":"initrd.img","typo":1}"#,
        );
        let err = load(dir.path(), "x").unwrap_err().to_string();
        assert!(err.contains("cannot read") && err.contains("typo"), "{err}");
    }
}
