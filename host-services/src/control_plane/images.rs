//! Container image functions (`PackageType: Image`): the image named by
//! `ImageUri`, an OCI image layout (a directory or a tar archive of one)
//! on the worker's host, is flattened once into a read-only EROFS file
//! system, cut into convergently sealed 512 KiB chunks in the chunk store
//! (chunks two images share are stored once) and recorded, sealed, with
//! its chunk manifest and what it says to run. Environments boot the
//! Linux guest on the chunked drive, which fetches a chunk when the
//! guest first reads it.

use crate::artifacts::chunk_store::StoredImage;
use crate::artifacts::container_image::{ImageLaunch, ImageRecord, ImportedImage};
use crate::artifacts::oci::{self, ImageRunConfig};
use crate::control_plane::functions::{code_key, ControlPlane};
use crate::control_plane::model::{FunctionConfiguration, ImageConfig};
use crate::control_plane::store::Txn;
use crate::error::ApiError;
use crate::ids::AccountId;

/// The local path an `ImageUri` names: a path, or a `file://` URL.
fn image_path(uri: &str) -> Result<&std::path::Path, ApiError> {
    let path = uri.strip_prefix("file://").unwrap_or(uri);
    if !path.starts_with('/') {
        return Err(ApiError::invalid(format!(
            "ImageUri {uri:?}: this worker takes an OCI image layout on its host, \
             by absolute path (a directory or a tar archive of one)"
        )));
    }
    Ok(std::path::Path::new(path))
}

impl ControlPlane {
    /// Reads, flattens and chunks the image `uri` names. Slow for a large
    /// image; nothing is recorded until [`Self::put_image`].
    pub(crate) fn import_image(&self, uri: &str) -> Result<ImportedImage, ApiError> {
        let path = image_path(uri)?;
        let (filesystem, flattened) = oci::filesystem_image(path)
            .map_err(|e| ApiError::invalid(format!("ImageUri {uri:?}: {e}")))?;
        let StoredImage {
            manifest,
            new_chunks,
        } = self
            .chunks
            .put(&filesystem)
            .map_err(|e| ApiError::Service(e.to_string()))?;
        tracing::info!(
            "image {uri} ({}): {} layers, {} bytes as {} chunks, {new_chunks} of them new",
            flattened.digest,
            flattened.layers,
            filesystem.len(),
            manifest.chunks.len()
        );
        Ok(ImportedImage {
            digest: flattened
                .digest
                .strip_prefix("sha256:")
                .unwrap_or(&flattened.digest)
                .to_string(),
            record: ImageRecord {
                uri: uri.to_string(),
                manifest: manifest.encode(),
                run: flattened.run,
            },
        })
    }

    /// Records an imported image for `account`, sealed.
    pub(crate) fn put_image(
        &self,
        t: &Txn,
        account: &AccountId,
        image: &ImportedImage,
    ) -> Result<(), ApiError> {
        let record = serde_json::to_vec(&image.record)
            .map_err(|e| ApiError::Service(format!("an image record: {e}")))?;
        self.put_code(t, &code_key(account, &image.digest), &record)
    }

    fn image_record(&self, account: &AccountId, digest: &str) -> Result<ImageRecord, ApiError> {
        serde_json::from_slice(&self.stored_code(account, digest)?)
            .map_err(|e| ApiError::Service(format!("image {digest}'s record: {e}")))
    }

    /// The `ImageUri` a version's image came from.
    pub fn image_uri(
        &self,
        account: &AccountId,
        config: &FunctionConfiguration,
    ) -> Result<String, ApiError> {
        Ok(self.image_record(account, &config.code_sha256)?.uri)
    }

    /// What an environment of the image function `config` runs: its
    /// `ImageConfig` over what the image says.
    pub(crate) fn image_launch(
        &self,
        account: &AccountId,
        config: &FunctionConfiguration,
    ) -> Result<ImageLaunch, ApiError> {
        let record = self.image_record(account, &config.code_sha256)?;
        let ImageConfig {
            entry_point,
            command,
            working_directory,
        } = config
            .image_config_response
            .as_ref()
            .map(|r| r.image_config.clone())
            .unwrap_or_default();
        let overrides = ImageRunConfig {
            entrypoint: entry_point,
            cmd: command,
            env: None,
            working_dir: working_directory,
        };
        ImageLaunch::resolve(record.manifest, record.run, overrides).map_err(ApiError::invalid)
    }
}
