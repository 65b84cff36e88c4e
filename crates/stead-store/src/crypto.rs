//! Secrets at rest: ChaCha20-Poly1305 with a random nonce per value, and the
//! app id and variable name as associated data so that a ciphertext copied
//! to another row does not decrypt there.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;

use crate::{Result, StoreError};

pub(crate) fn encrypt(
    key: &[u8; 32],
    app_id: i64,
    name: &str,
    plaintext: &str,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
    let mut nonce = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut nonce);
    let aad = format!("{app_id}:{name}");
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext.as_bytes(),
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| StoreError::Decrypt {
            key: name.to_string(),
        })?;
    Ok((ct, nonce.to_vec()))
}

pub(crate) fn decrypt(
    key: &[u8; 32],
    app_id: i64,
    name: &str,
    ciphertext: &[u8],
    nonce: &[u8],
) -> Result<String> {
    if nonce.len() != 12 {
        return Err(StoreError::Decrypt {
            key: name.to_string(),
        });
    }
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
    let aad = format!("{app_id}:{name}");
    let pt = cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| StoreError::Decrypt {
            key: name.to_string(),
        })?;
    String::from_utf8(pt).map_err(|_| StoreError::Decrypt {
        key: name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let key = [7u8; 32];
        let (ct, nonce) = encrypt(&key, 1, "K", "hunter2").unwrap();
        assert_ne!(ct, b"hunter2");
        assert_eq!(decrypt(&key, 1, "K", &ct, &nonce).unwrap(), "hunter2");
        assert!(decrypt(&key, 2, "K", &ct, &nonce).is_err());
        assert!(decrypt(&[8u8; 32], 1, "K", &ct, &nonce).is_err());
    }
}
