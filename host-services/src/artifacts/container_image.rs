//! What the worker keeps of a container image function's image, and what
//! an environment needs to run it.

use serde::{Deserialize, Serialize};

use crate::artifacts::oci::ImageRunConfig;

/// What the store keeps of an imported image, sealed: the chunk manifest
/// holds every chunk's key.
#[derive(Serialize, Deserialize)]
pub struct ImageRecord {
    pub uri: String,
    /// The encoded chunk manifest.
    pub manifest: Vec<u8>,
    pub run: ImageRunConfig,
}

/// An image read from its URI, ready for the control plane to store.
pub struct ImportedImage {
    /// The image manifest's digest without `sha256:`, the function's
    /// CodeSha256, as Lambda reports an image's.
    pub digest: String,
    pub record: ImageRecord,
}

/// How an environment runs an image: its chunk manifest, the command
/// line and working directory, the handler (CMD's first word, as Lambda
/// sets `_HANDLER` for an image) and the image's variables.
#[derive(Clone)]
pub struct ImageLaunch {
    pub manifest: Vec<u8>,
    pub argv: Vec<String>,
    pub working_dir: String,
    pub handler: String,
    pub env: Vec<(String, String)>,
}
