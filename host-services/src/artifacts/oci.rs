//! Container images: an OCI image layout (a directory, or a tar archive
//! of one) flattened into one filesystem tree, as Lambda's on-demand
//! container loading does before it cuts the image into chunks.
//!
//! The layout's `index.json` names the image manifest (for linux/amd64
//! when it names several), the manifest its layers; every blob is checked
//! against its digest. Layers (tar, or gzip-compressed tar) are applied in
//! order with OCI whiteouts: `.wh.NAME` deletes NAME from the layers
//! below, `.wh..wh..opq` empties its directory of them. No entry may leave
//! the root: `..` and entries reached through a symbolic link are
//! refused, hard links must point inside the tree. Device nodes and FIFOs
//! are skipped; set-id bits are dropped.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The most a flattened image may hold: Lambda allows 10 GB images; this
/// worker keeps its images in memory while it builds them.
pub const MAX_IMAGE_BYTES: u64 = 2 << 30;
const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("the image layout: {0}")]
    Layout(String),
    #[error("blob {digest}: {reason}")]
    Blob { digest: String, reason: String },
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    Unsafe {
        layer: usize,
        entry: String,
        reason: String,
    },
    #[error("layer {layer}: {reason}")]
    Layer { layer: usize, reason: String },
    #[error("the image holds more than {MAX_IMAGE_BYTES} bytes")]
    TooLarge,
    #[error(transparent)]
    Erofs(#[from] crate::artifacts::erofs_image::ErofsError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OciError + '_ {
    move |source| OciError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: Option<String>,
    digest: String,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Option<Descriptor>,
    layers: Vec<Descriptor>,
}

/// What the image says to run, from its config blob's `config`: Lambda
/// runs ENTRYPOINT with CMD as its arguments, in WORKDIR, with ENV under
/// the function's own variables.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageRunConfig {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
}

#[derive(Deserialize)]
struct ImageConfigBlob {
    #[serde(default)]
    config: Option<ImageRunConfig>,
    architecture: Option<String>,
    os: Option<String>,
}

/// The layout's files: from its directory, or read out of its tarball.
enum Layout {
    Dir(PathBuf),
    Tar(HashMap<String, Vec<u8>>),
}

impl Layout {
    fn open(path: &Path) -> Result<Self, OciError> {
        if path.is_dir() {
            return Ok(Layout::Dir(path.to_path_buf()));
        }
        let file = std::fs::File::open(path).map_err(io(path))?;
        let mut files = HashMap::new();
        let mut total = 0u64;
        let mut archive = tar::Archive::new(file);
        for entry in archive.entries().map_err(io(path))? {
            let mut entry = entry.map_err(io(path))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry.path().map_err(io(path))?;
            let name = normalize(&name)
                .ok_or_else(|| OciError::Layout(format!("{} leaves the layout", name.display())))?;
            total += entry.size();
            if total > MAX_IMAGE_BYTES {
                return Err(OciError::TooLarge);
            }
            let mut data = Vec::with_capacity(entry.size() as usize);
            entry.read_to_end(&mut data).map_err(io(path))?;
            files.insert(name.to_string_lossy().into_owned(), data);
        }
        Ok(Layout::Tar(files))
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, OciError> {
        match self {
            Layout::Dir(dir) => std::fs::read(dir.join(name)).map_err(io(&dir.join(name))),
            Layout::Tar(files) => files
                .get(name)
                .cloned()
                .ok_or_else(|| OciError::Layout(format!("no {name} in the archive"))),
        }
    }

    /// A blob, checked against its digest.
    fn blob(&self, digest: &str) -> Result<Vec<u8>, OciError> {
        let bad = |reason: &str| OciError::Blob {
            digest: digest.to_string(),
            reason: reason.to_string(),
        };
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| bad("not a sha256 digest"))?;
        let data = self.read(&format!("blobs/sha256/{hex}"))?;
        if hex::encode(Sha256::digest(&data)) != hex.to_ascii_lowercase() {
            return Err(bad("its content does not match its digest"));
        }
        Ok(data)
    }
}

/// `path` as a relative path of normal components, or None if it climbs.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn json<T: for<'de> Deserialize<'de>>(what: &str, data: &[u8]) -> Result<T, OciError> {
    serde_json::from_slice(data).map_err(|e| OciError::Layout(format!("{what}: {e}")))
}

/// What flattening found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Flattened {
    pub layers: usize,
    pub bytes: u64,
    pub skipped_devices: usize,
    /// The image manifest's digest (`sha256:...`): the image's identity.
    pub digest: String,
    pub run: ImageRunConfig,
}

/// Flattens the image layout at `layout` into the empty directory `root`.
pub fn flatten(layout: &Path, root: &Path) -> Result<Flattened, OciError> {
    let layout = Layout::open(layout)?;
    let index: Index = json("index.json", &layout.read("index.json")?)?;
    let mut descriptor = pick(index.manifests)?;
    // An index may point at a further index (a multi-platform image).
    if descriptor.media_type.as_deref() == Some("application/vnd.oci.image.index.v1+json") {
        let nested: Index = json("the nested index", &layout.blob(&descriptor.digest)?)?;
        descriptor = pick(nested.manifests)?;
    }
    let manifest: Manifest = json("the image manifest", &layout.blob(&descriptor.digest)?)?;
    let run = match &manifest.config {
        Some(config) => {
            let blob: ImageConfigBlob = json("the image config", &layout.blob(&config.digest)?)?;
            // An index may name no platform; the config does.
            for (what, got, want) in [
                ("architecture", &blob.architecture, "amd64"),
                ("os", &blob.os, "linux"),
            ] {
                if got.as_deref().is_some_and(|g| g != want) {
                    return Err(OciError::Layout(format!(
                        "the image is for {what} {got:?}; this worker runs linux/amd64"
                    )));
                }
            }
            blob.config.unwrap_or_default()
        }
        None => ImageRunConfig::default(),
    };
    let mut flattened = Flattened {
        digest: descriptor.digest.clone(),
        run,
        ..Flattened::default()
    };
    for (i, layer) in manifest.layers.iter().enumerate() {
        let gzip = match layer.media_type.as_deref() {
            Some("application/vnd.oci.image.layer.v1.tar") => false,
            Some("application/vnd.oci.image.layer.v1.tar+gzip")
            | Some("application/vnd.docker.image.rootfs.diff.tar.gzip") => true,
            other => {
                return Err(OciError::Layer {
                    layer: i,
                    reason: format!("unsupported media type {other:?} (tar or tar+gzip)"),
                })
            }
        };
        let blob = layout.blob(&layer.digest)?;
        let reader: Box<dyn Read> = if gzip {
            Box::new(flate2::read::GzDecoder::new(&blob[..]))
        } else {
            Box::new(&blob[..])
        };
        apply_layer(i, reader, root, &mut flattened)?;
        flattened.layers += 1;
    }
    Ok(flattened)
}

/// Where the guest mounts its own file systems over a read-only image
/// root: a container runtime makes these if the image has none.
const MOUNT_POINTS: [&str; 3] = ["proc", "dev", "tmp"];

/// The image at `layout`, flattened and made the read-only filesystem
/// image the guest mounts.
pub fn filesystem_image(layout: &Path) -> Result<(Vec<u8>, Flattened), OciError> {
    let mut flattened = Flattened::default();
    let image = crate::artifacts::erofs_image::build_with(|root| {
        flattened = flatten(layout, root)?;
        for dir in MOUNT_POINTS {
            let path = root.join(dir);
            if std::fs::symlink_metadata(&path).is_err() {
                std::fs::create_dir(&path).map_err(io(&path))?;
            }
        }
        Ok::<(), OciError>(())
    })?;
    Ok((image, flattened))
}

/// Writes an OCI image layout to `dir`: one gzip-compressed layer per tar
/// archive in `layers`, and an image config with `run`. Tests and tools
/// build images with it.
pub fn write_layout(dir: &Path, layers: &[Vec<u8>], run: &ImageRunConfig) -> std::io::Result<()> {
    use std::io::Write;
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |data: &[u8]| -> std::io::Result<(String, usize)> {
        let hex = hex::encode(Sha256::digest(data));
        std::fs::write(blobs.join(&hex), data)?;
        Ok((format!("sha256:{hex}"), data.len()))
    };
    let mut descriptors = Vec::new();
    for layer in layers {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(layer)?;
        let (digest, size) = put(&gz.finish()?)?;
        descriptors.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest,
            "size": size,
        }));
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": []},
    });
    let (config, config_size) = put(config.to_string().as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
        "layers": descriptors,
    });
    let (manifest, manifest_size) = put(manifest.to_string().as_bytes())?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    });
    std::fs::write(dir.join("index.json"), index.to_string())?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
}

/// The linux/amd64 manifest, or the only one.
fn pick(manifests: Vec<Descriptor>) -> Result<Descriptor, OciError> {
    let count = manifests.len();
    let mut candidates = manifests.into_iter().filter(|d| {
        d.platform
            .as_ref()
            .is_none_or(|p| p.os == "linux" && p.architecture == "amd64")
    });
    candidates.next().ok_or_else(|| {
        OciError::Layout(format!("none of the {count} manifests is for linux/amd64"))
    })
}

/// Refuses a path whose parent, inside `root`, is a symbolic link: writing
/// there would land outside the tree.
fn check_parents(root: &Path, relative: &Path) -> Result<(), String> {
    let mut at = root.to_path_buf();
    let parents: Vec<_> = relative.components().collect();
    for component in &parents[..parents.len().saturating_sub(1)] {
        at.push(component);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "it passes through the symbolic link {}",
                    at.display()
                ))
            }
            Ok(m) if !m.is_dir() => return Err(format!("{} is not a directory", at.display())),
            _ => {}
        }
    }
    Ok(())
}

/// Removes whatever is at `path`, without following links.
fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn apply_layer(
    layer: usize,
    reader: impl Read,
    root: &Path,
    flattened: &mut Flattened,
) -> Result<(), OciError> {
    let layer_error = |reason: String| OciError::Layer { layer, reason };
    let mut archive = tar::Archive::new(reader);
    // What this layer wrote: an opaque whiteout hides only lower layers.
    let mut written: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().map_err(|e| layer_error(e.to_string()))? {
        let mut entry = entry.map_err(|e| layer_error(e.to_string()))?;
        let raw = entry
            .path()
            .map_err(|e| layer_error(e.to_string()))?
            .into_owned();
        let unsafe_entry = |reason: String| OciError::Unsafe {
            layer,
            entry: raw.display().to_string(),
            reason,
        };
        let relative = normalize(&raw).ok_or_else(|| unsafe_entry("it leaves the root".into()))?;
        if relative.as_os_str().is_empty() {
            continue;
        }
        check_parents(root, &relative).map_err(unsafe_entry)?;
        let path = root.join(&relative);
        let name = relative
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = path.parent().unwrap_or(root).to_path_buf();
        if name == OPAQUE {
            for child in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                let child = child.path();
                let ours = child.strip_prefix(root).is_ok_and(|r| written.contains(r));
                if !ours {
                    remove_any(&child).map_err(io(&child))?;
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            let target = parent.join(hidden);
            remove_any(&target).map_err(io(&target))?;
            continue;
        }
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        if kind.is_dir() {
            if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_dir()) {
                remove_any(&path).map_err(io(&path))?;
            }
            std::fs::create_dir_all(&path).map_err(io(&path))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode | 0o700))
                .map_err(io(&path))?;
        } else if kind.is_file() {
            flattened.bytes += entry.size();
            if flattened.bytes > MAX_IMAGE_BYTES {
                return Err(OciError::TooLarge);
            }
            remove_any(&path).map_err(io(&path))?;
            let mut data = Vec::with_capacity(entry.size() as usize);
            entry
                .read_to_end(&mut data)
                .map_err(|e| layer_error(e.to_string()))?;
            std::fs::write(&path, &data).map_err(io(&path))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(io(&path))?;
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(|e| layer_error(e.to_string()))?
                .ok_or_else(|| unsafe_entry("a link without a target".into()))?;
            remove_any(&path).map_err(io(&path))?;
            // Stored, never followed here: the guest resolves it inside
            // its own mount.
            std::os::unix::fs::symlink(&target, &path).map_err(io(&path))?;
        } else if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(|e| layer_error(e.to_string()))?
                .and_then(|t| normalize(&t))
                .ok_or_else(|| unsafe_entry("a hard link that leaves the root".into()))?;
            check_parents(root, &target).map_err(unsafe_entry)?;
            let source = root.join(&target);
            if !std::fs::symlink_metadata(&source).is_ok_and(|m| m.is_file()) {
                return Err(unsafe_entry(format!(
                    "a hard link to {}, which is not a file of the image",
                    target.display()
                )));
            }
            remove_any(&path).map_err(io(&path))?;
            std::fs::hard_link(&source, &path).map_err(io(&path))?;
        } else {
            flattened.skipped_devices += 1;
            continue;
        }
        written.insert(relative);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One layer entry.
    pub enum Entry<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Symlink(&'a str, &'a str),
        HardLink(&'a str, &'a str),
    }

    pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in entries {
            let mut header = tar::Header::new_gnu();
            header.set_mtime(0);
            match entry {
                Entry::File(path, data) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(data.len() as u64);
                    header.set_mode(0o755);
                    builder.append_data(&mut header, path, *data).unwrap();
                }
                Entry::Dir(path) => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    header.set_mode(0o755);
                    builder.append_data(&mut header, path, &[][..]).unwrap();
                }
                Entry::Symlink(path, target) | Entry::HardLink(path, target) => {
                    let kind = match entry {
                        Entry::Symlink(..) => tar::EntryType::Symlink,
                        _ => tar::EntryType::Link,
                    };
                    header.set_entry_type(kind);
                    header.set_size(0);
                    builder.append_link(&mut header, path, target).unwrap();
                }
            }
        }
        builder.into_inner().unwrap()
    }

    pub fn write_layout(dir: &Path, layers: &[Vec<u8>]) {
        super::write_layout(dir, layers, &ImageRunConfig::default()).unwrap();
    }

    pub fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("oci-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_image_for_another_architecture_is_refused_naming_it() {
        let dir = scratch("arm64");
        let layer = layer_tar(&[Entry::File("bin/serve", b"#!")]);
        let layout = dir.join("layout");
        super::write_layout(&layout, &[layer], &ImageRunConfig::default()).unwrap();
        std::fs::create_dir_all(dir.join("root")).unwrap();
        let refused = |layout: &Path| flatten(layout, &dir.join("root")).unwrap_err().to_string();
        // The index names only an arm64 manifest.
        let index = std::fs::read_to_string(layout.join("index.json")).unwrap();
        std::fs::write(layout.join("index.json"), index.replace("amd64", "arm64")).unwrap();
        assert!(refused(&layout).contains("none of the 1 manifests is for linux/amd64"));
        // The index names no platform, the config says arm64.
        let mut index: serde_json::Value = serde_json::from_str(&index).unwrap();
        index["manifests"][0]
            .as_object_mut()
            .unwrap()
            .remove("platform");
        std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
        let manifest_hex = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(layout.join("blobs/sha256").join(&manifest_hex)).unwrap(),
        )
        .unwrap();
        let config_path = layout
            .join("blobs/sha256")
            .join(&manifest["config"]["digest"].as_str().unwrap()[7..]);
        let config = std::fs::read_to_string(&config_path)
            .unwrap()
            .replace("amd64", "arm64");
        // Stored under its new digest, named by a manifest and index anew.
        let put = |data: &[u8]| {
            let hex = hex::encode(Sha256::digest(data));
            std::fs::write(layout.join("blobs/sha256").join(&hex), data).unwrap();
            format!("sha256:{hex}")
        };
        let mut manifest = manifest;
        manifest["config"]["digest"] = put(config.as_bytes()).into();
        index["manifests"][0]["digest"] = put(manifest.to_string().as_bytes()).into();
        std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
        let message = refused(&layout);
        assert!(
            message.contains("architecture") && message.contains("arm64"),
            "{message}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_image_config_says_what_to_run_and_the_manifest_digest_names_the_image() {
        let dir = scratch("run-config");
        let run = ImageRunConfig {
            entrypoint: Some(vec!["/bin/serve".into()]),
            cmd: Some(vec!["app.handler".into()]),
            env: Some(vec!["PATH=/bin".into()]),
            working_dir: Some("/srv".into()),
        };
        let layer = layer_tar(&[Entry::File("bin/serve", b"#!")]);
        super::write_layout(&dir.join("layout"), &[layer], &run).unwrap();
        std::fs::create_dir_all(dir.join("root")).unwrap();
        let flattened = flatten(&dir.join("layout"), &dir.join("root")).unwrap();
        assert_eq!(flattened.run, run);
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("layout/index.json")).unwrap()).unwrap();
        assert_eq!(flattened.digest, index["manifests"][0]["digest"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts_links_and_opaque_directories() {
        let dir = scratch("flatten");
        let base = layer_tar(&[
            Entry::Dir("etc"),
            Entry::File("etc/keep", b"base"),
            Entry::File("etc/gone", b"deleted above"),
            Entry::Dir("opt/tool"),
            Entry::File("opt/tool/old", b"hidden by opaque"),
            Entry::File("usr/bin/app", b"v1"),
        ]);
        let upper = layer_tar(&[
            Entry::File("etc/.wh.gone", b""),
            Entry::File("opt/tool/.wh..wh..opq", b""),
            Entry::File("opt/tool/new", b"upper"),
            Entry::File("usr/bin/app", b"v2"),
            Entry::Symlink("usr/bin/alias", "/usr/bin/app"),
            Entry::HardLink("usr/bin/same", "usr/bin/app"),
        ]);
        write_layout(&dir.join("layout"), &[base, upper]);
        let root = dir.join("root");
        std::fs::create_dir(&root).unwrap();
        let report = flatten(&dir.join("layout"), &root).unwrap();
        assert_eq!(report.layers, 2);
        assert_eq!(std::fs::read(root.join("etc/keep")).unwrap(), b"base");
        assert!(!root.join("etc/gone").exists());
        assert!(!root.join("opt/tool/old").exists());
        assert_eq!(std::fs::read(root.join("opt/tool/new")).unwrap(), b"upper");
        assert_eq!(std::fs::read(root.join("usr/bin/app")).unwrap(), b"v2");
        assert_eq!(std::fs::read(root.join("usr/bin/same")).unwrap(), b"v2");
        assert_eq!(
            std::fs::read_link(root.join("usr/bin/alias")).unwrap(),
            Path::new("/usr/bin/app")
        );

        // The same layout as a tarball flattens the same.
        let tarball = dir.join("image.tar");
        let mut builder = tar::Builder::new(std::fs::File::create(&tarball).unwrap());
        builder.append_dir_all(".", dir.join("layout")).unwrap();
        builder.finish().unwrap();
        let root2 = dir.join("root2");
        std::fs::create_dir(&root2).unwrap();
        assert_eq!(flatten(&tarball, &root2).unwrap(), report);
        assert_eq!(std::fs::read(root2.join("opt/tool/new")).unwrap(), b"upper");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn entries_that_leave_the_root_and_bad_blobs_are_refused() {
        let dir = scratch("unsafe");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                layer_tar(&[
                    Entry::Symlink("escape", "/etc"),
                    Entry::File("escape/passwd", b"x"),
                ]),
                "passes through the symbolic link",
            ),
            (
                layer_tar(&[Entry::HardLink("copy", "../../etc/passwd")]),
                "a hard link that leaves the root",
            ),
            (
                layer_tar(&[Entry::HardLink("copy", "missing")]),
                "not a file of the image",
            ),
        ];
        for (i, (layer, expected)) in cases.into_iter().enumerate() {
            let case = dir.join(format!("case{i}"));
            write_layout(&case.join("layout"), &[layer]);
            let root = case.join("root");
            std::fs::create_dir_all(&root).unwrap();
            let err = flatten(&case.join("layout"), &root)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "case {i}: {err}");
        }
        // `..` in a raw tar header (the tar crate refuses to write one).
        let mut raw = layer_tar(&[Entry::File("aaaaaaaaaaa", b"x")]);
        raw[..11].copy_from_slice(b"../evil.txt");
        let mut header = tar::Header::from_byte_slice(&raw[..512]).clone();
        header.set_cksum();
        raw[..512].copy_from_slice(header.as_bytes());
        let case = dir.join("dotdot");
        write_layout(&case.join("layout"), &[raw]);
        std::fs::create_dir_all(case.join("root")).unwrap();
        let err = flatten(&case.join("layout"), &case.join("root"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("leaves the root"), "{err}");
        assert!(!dir.join("evil.txt").exists());

        // A layer blob that does not match its digest.
        let layout = dir.join("case0/layout");
        let blob = std::fs::read_dir(layout.join("blobs/sha256"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| std::fs::read(p).unwrap().starts_with(&[0x1f, 0x8b]))
            .unwrap();
        let mut bytes = std::fs::read(&blob).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&blob, bytes).unwrap();
        let root = dir.join("case0/root3");
        std::fs::create_dir_all(&root).unwrap();
        let err = flatten(&layout, &root).unwrap_err().to_string();
        assert!(err.contains("does not match its digest"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
