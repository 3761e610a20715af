//! Test JWTs, for the OIDC tests of several test binaries (included by path).

/// A JWT whose payload is `claims` (JSON text), base64url without padding, as issuers write it;
/// its signature is not checked, so any base64url will do.
pub fn jwt(claims: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let part = |text: &str| URL_SAFE_NO_PAD.encode(text);
    format!(
        "{}.{}.{}",
        part(r#"{"alg":"RS256","typ":"JWT"}"#),
        part(claims),
        part("signature-not-checked")
    )
}
