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

impl ImageLaunch {
    /// What an environment runs for an image that says `image`, under the
    /// function's `overrides` (its ImageConfig: entry point, command and
    /// working directory), as Lambda runs an image: the entry point
    /// followed by the command, each the function's if it gives one, else
    /// the image's; the working directory likewise (`/` without either);
    /// the image's ENV. Without an entry point or a command it refuses,
    /// saying so.
    pub fn resolve(
        manifest: Vec<u8>,
        image: ImageRunConfig,
        overrides: ImageRunConfig,
    ) -> Result<ImageLaunch, String> {
        let command = overrides.cmd.or(image.cmd).unwrap_or_default();
        let handler = command.first().cloned().unwrap_or_default();
        let mut argv = overrides
            .entrypoint
            .or(image.entrypoint)
            .unwrap_or_default();
        argv.extend(command);
        if argv.is_empty() {
            return Err("the image has no ENTRYPOINT or CMD, and ImageConfig gives neither".into());
        }
        let env = image
            .env
            .unwrap_or_default()
            .into_iter()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect();
        Ok(ImageLaunch {
            manifest,
            argv,
            working_dir: overrides
                .working_dir
                .or(image.working_dir)
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "/".into()),
            handler,
            env,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> Option<Vec<String>> {
        Some(items.iter().map(|s| s.to_string()).collect())
    }

    fn image() -> ImageRunConfig {
        ImageRunConfig {
            entrypoint: list(&["/lambda-entrypoint.sh"]),
            cmd: list(&["app.handler"]),
            env: list(&["PATH=/usr/bin", "LANG=C.UTF-8", "NOT_A_PAIR"]),
            working_dir: Some("/var/task".into()),
        }
    }

    fn resolve(image: ImageRunConfig, overrides: ImageRunConfig) -> Result<ImageLaunch, String> {
        ImageLaunch::resolve(Vec::new(), image, overrides)
    }

    #[test]
    fn the_image_runs_its_entrypoint_with_its_cmd_in_its_workdir_with_its_env() {
        let launch = resolve(image(), ImageRunConfig::default()).unwrap();
        assert_eq!(launch.argv, ["/lambda-entrypoint.sh", "app.handler"]);
        assert_eq!(launch.working_dir, "/var/task");
        assert_eq!(launch.handler, "app.handler");
        assert_eq!(
            launch.env,
            [
                ("PATH".into(), "/usr/bin".into()),
                ("LANG".into(), "C.UTF-8".into())
            ]
        );
    }

    #[test]
    fn image_config_replaces_each_part_it_gives_and_only_that() {
        let command_only = ImageRunConfig {
            cmd: list(&["other.handler", "--flag"]),
            ..ImageRunConfig::default()
        };
        let launch = resolve(image(), command_only).unwrap();
        assert_eq!(
            launch.argv,
            ["/lambda-entrypoint.sh", "other.handler", "--flag"]
        );
        assert_eq!(launch.handler, "other.handler");
        assert_eq!(launch.working_dir, "/var/task");

        let all = ImageRunConfig {
            entrypoint: list(&["/bin/run"]),
            cmd: list(&[]),
            env: None,
            working_dir: Some("/srv".into()),
        };
        let launch = resolve(image(), all).unwrap();
        assert_eq!(launch.argv, ["/bin/run"], "an empty Command clears CMD");
        assert_eq!(launch.handler, "");
        assert_eq!(launch.working_dir, "/srv");
    }

    #[test]
    fn without_a_workdir_the_root_and_without_anything_to_run_a_refusal() {
        let bare = ImageRunConfig {
            entrypoint: list(&["/bin/run"]),
            working_dir: Some(String::new()),
            ..ImageRunConfig::default()
        };
        assert_eq!(
            resolve(bare, ImageRunConfig::default())
                .unwrap()
                .working_dir,
            "/"
        );
        // No Debug for a launch: its manifest holds the chunks' keys.
        match resolve(ImageRunConfig::default(), ImageRunConfig::default()) {
            Err(e) => assert!(e.contains("no ENTRYPOINT or CMD"), "{e}"),
            Ok(_) => panic!("an image with nothing to run was taken"),
        }
    }
}
