//! The start-up message: the environment variables the host gives a
//! function (the runtime's own, the execution role's credentials and the
//! user's), sent once over vsock when the guest connects to
//! [`ENVIRON_PORT`], then the host closes the stream.
//!
//! Layout: `b"LMBDENV1"`, a count (u32 LE), then per variable the key's
//! length (u32 LE), the key, the value's length (u32 LE), the value.
//! Everything is checked; a malformed message is an error that names
//! what is wrong, never a panic.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// For a container image, the variables that tell the init what to run
/// (the image's command line, `IMAGE_ARG` + 0, 1, ..., and its working
/// directory); the init keeps them from the function. A user's variable
/// cannot start with `_`.
pub const IMAGE_ARG: &str = "_LAMBDA_IMAGE_ARG_";
pub const IMAGE_WORKDIR: &str = "_LAMBDA_IMAGE_WORKDIR";

/// The host's vsock port for the start-up message.
pub const ENVIRON_PORT: u32 = 9003;
pub const MAGIC: &[u8; 8] = b"LMBDENV1";
/// Far above Lambda's 4 KiB of user variables plus the runtime's own.
pub const MAX_MESSAGE: usize = 64 * 1024;
pub const MAX_VARIABLES: usize = 1024;

#[derive(Debug, PartialEq, Eq)]
pub struct EnvironError(pub String);

impl fmt::Display for EnvironError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed environment message: {}", self.0)
    }
}

fn error<T>(message: String) -> Result<T, EnvironError> {
    Err(EnvironError(message))
}

/// Encodes `variables`. Keys and values that could not be decoded are
/// refused here, so that the host never sends what the guest rejects.
pub fn encode<'a>(
    variables: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Vec<u8>, EnvironError> {
    let mut out = Vec::from(&MAGIC[..]);
    out.extend_from_slice(&[0; 4]);
    let mut count = 0u32;
    for (key, value) in variables {
        check(key, value)?;
        for part in [key, value] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        count += 1;
    }
    if count as usize > MAX_VARIABLES || out.len() > MAX_MESSAGE {
        return error(format!(
            "{count} variables in {} bytes; the limits are {MAX_VARIABLES} and {MAX_MESSAGE}",
            out.len()
        ));
    }
    out[8..12].copy_from_slice(&count.to_le_bytes());
    Ok(out)
}

fn check(key: &str, value: &str) -> Result<(), EnvironError> {
    if key.is_empty() || key.contains(['=', '\0']) {
        return error(format!(
            "variable name {key:?} is empty or holds '=' or NUL"
        ));
    }
    if value.contains('\0') {
        return error(format!("the value of {key} holds a NUL"));
    }
    Ok(())
}

/// A cursor over the message that never reads past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], EnvironError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return error(format!(
                "{what} ({n} bytes at offset {}) runs past the end ({} bytes)",
                self.at,
                self.bytes.len()
            ));
        };
        let part = &self.bytes[self.at..end];
        self.at = end;
        Ok(part)
    }

    fn u32(&mut self, what: &str) -> Result<u32, EnvironError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self, what: &str) -> Result<String, EnvironError> {
        let len = self.u32(what)? as usize;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| EnvironError(format!("{what} is not UTF-8")))
    }
}

/// Decodes a whole message.
pub fn decode(bytes: &[u8]) -> Result<Vec<(String, String)>, EnvironError> {
    if bytes.len() > MAX_MESSAGE {
        return error(format!("{} bytes, over {MAX_MESSAGE}", bytes.len()));
    }
    let mut r = Reader { bytes, at: 0 };
    if r.take(8, "the magic")? != MAGIC {
        return error("it does not start with LMBDENV1".into());
    }
    let count = r.u32("the count")? as usize;
    if count > MAX_VARIABLES {
        return error(format!("{count} variables, over {MAX_VARIABLES}"));
    }
    let mut variables = Vec::with_capacity(count);
    for i in 0..count {
        let key = r.string(&format!("variable {i}'s name"))?;
        let value = r.string(&format!("variable {i}'s value"))?;
        check(&key, &value)?;
        variables.push((key, value));
    }
    if r.at != bytes.len() {
        return error(format!(
            "{} bytes after the last variable",
            bytes.len() - r.at
        ));
    }
    Ok(variables)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let vars = [
            ("AWS_REGION", "local"),
            ("EMPTY", ""),
            ("UNICODE", "héllo=1"),
        ];
        let bytes = encode(vars).unwrap();
        let back = decode(&bytes).unwrap();
        assert_eq!(
            back.iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Vec<_>>(),
            vars
        );
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let bytes = encode([("KEY", "value"), ("OTHER", "x")]).unwrap();
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "truncated to {n}");
        }
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[i] ^= flip;
                // Some flips give another valid message; none may panic.
                let _ = decode(&bad);
            }
        }
        let mut huge_len = bytes.clone();
        huge_len[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge_len)
            .unwrap_err()
            .0
            .contains("runs past the end"));
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(decode(&extra).unwrap_err().0.contains("after the last"));
    }

    #[test]
    fn bad_names_and_values_are_refused_both_ways() {
        assert!(encode([("A=B", "x")]).is_err());
        assert!(encode([("", "x")]).is_err());
        assert!(encode([("A", "x\0y")]).is_err());
        let mut bytes = encode([("AB", "x")]).unwrap();
        bytes[16] = b'=';
        assert!(decode(&bytes).unwrap_err().0.contains("'='"));
        let mut too_many = encode([("A", "x")]).unwrap();
        too_many[8..12].copy_from_slice(&(MAX_VARIABLES as u32 + 1).to_le_bytes());
        assert!(decode(&too_many).unwrap_err().0.contains("over"));
    }
}
