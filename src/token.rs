//! Client tokens: a statement signed with the cluster CA's key ("clients
//! holding this may register names starting with PREFIX until EXPIRY"), which
//! any node verifies with the CA certificate alone, with no central storage.
//!
//! Format: `hex(MessagePack(claims)) "." hex(ECDSA P-256 signature)`.

use serde::{Deserialize, Serialize};

use crate::pki::{CaPem, PkiError};

/// What a token allows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// Unix seconds after which the token is void.
    pub expires_at: u64,
    /// Names the holder may register must start with this (empty: any).
    pub prefix: String,
    /// Random, so two tokens with the same claims differ.
    pub nonce: u64,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not in the token format.
    #[error("malformed client token")]
    Malformed,
    /// The signature is not the cluster CA's.
    #[error("client token not signed by the cluster CA")]
    BadSignature,
    /// Past its expiry.
    #[error("client token expired")]
    Expired,
    /// The name does not start with the token's prefix.
    #[error("client token does not allow the name {0:?}")]
    NameNotAllowed(String),
}

/// Signs a token with the CA key.
pub fn issue(ca: &CaPem, claims: &TokenClaims) -> Result<String, PkiError> {
    let key = rcgen::KeyPair::from_pem(&ca.key).map_err(|source| PkiError::Cert {
        context: "reading the CA key".into(),
        source,
    })?;
    let body = rmp_serde::to_vec(claims).expect("claims encode");
    let sig = rcgen::SigningKey::sign(&key, &body).map_err(|source| PkiError::Cert {
        context: "signing the token".into(),
        source,
    })?;
    Ok(format!("{}.{}", hex::encode(body), hex::encode(sig)))
}

/// Checks a token against the CA certificate (DER), the time and the names.
pub fn verify(
    ca_cert_der: &[u8],
    token: &str,
    now_unix: u64,
    names: &[String],
) -> Result<TokenClaims, TokenError> {
    let (body_hex, sig_hex) = token.trim().split_once('.').ok_or(TokenError::Malformed)?;
    let body = hex::decode(body_hex).map_err(|_| TokenError::Malformed)?;
    let sig = hex::decode(sig_hex).map_err(|_| TokenError::Malformed)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(ca_cert_der).map_err(|_| TokenError::BadSignature)?;
    let public = cert
        .tbs_certificate
        .subject_pki
        .subject_public_key
        .data
        .to_vec();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public)
        .verify(&body, &sig)
        .map_err(|_| TokenError::BadSignature)?;
    let claims: TokenClaims = rmp_serde::from_slice(&body).map_err(|_| TokenError::Malformed)?;
    if now_unix >= claims.expires_at {
        return Err(TokenError::Expired);
    }
    if let Some(bad) = names.iter().find(|n| !n.starts_with(&claims.prefix)) {
        return Err(TokenError::NameNotAllowed(bad.clone()));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::make_ca;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    fn der(ca: &CaPem) -> Vec<u8> {
        CertificateDer::from_pem_slice(ca.cert.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn tokens_verify_only_under_their_ca_before_expiry_for_their_prefix() {
        let ca = make_ca("a").unwrap();
        let other = make_ca("b").unwrap();
        let claims = TokenClaims {
            expires_at: 1_000,
            prefix: "team-".into(),
            nonce: 7,
        };
        let token = issue(&ca, &claims).unwrap();
        let names = vec!["team-web".to_string()];
        assert_eq!(verify(&der(&ca), &token, 999, &names).unwrap(), claims);
        assert_eq!(
            verify(&der(&other), &token, 999, &names),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify(&der(&ca), &token, 1_000, &names),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify(&der(&ca), &token, 5, &["other".to_string()]),
            Err(TokenError::NameNotAllowed("other".into()))
        );
        // Tampering with the claims breaks the signature.
        let forged = TokenClaims {
            expires_at: u64::MAX,
            ..claims
        };
        let (_, sig) = token.split_once('.').unwrap();
        let tampered = format!("{}.{sig}", hex::encode(rmp_serde::to_vec(&forged).unwrap()));
        assert_eq!(
            verify(&der(&ca), &tampered, 5, &names),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify(&der(&ca), "garbage", 5, &names),
            Err(TokenError::Malformed)
        );
    }
}
