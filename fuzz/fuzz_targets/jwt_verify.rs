//! Protects token verification (`tokens::jwt::VerificationKeys`), configured as a service is
//! during a rotation: an HS256 secret and an Ed25519 public key accepted side by side, so
//! algorithm confusion is in reach. Arbitrary strings and edits of genuine tokens (bytes
//! flipped, inserted, deleted, segments spliced between tokens) never panic, and whatever
//! verifies is a genuine token's signed part with that token's claims: no input is accepted with
//! claims nobody signed. `verify` agrees with `verify_untyped` on the token type.
#![no_main]

use std::sync::OnceLock;

use tokens::settings::JwtArgs;
use tokens::jwt::{Claims, JwtKeys, SecretPolicy, TokenError, TokenType, VerificationKeys};
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    keys: VerificationKeys,
    /// Genuine tokens and their claims: HS256 access, EdDSA access, HS256 refresh.
    tokens: Vec<(String, Claims)>,
}

const B64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn args(algorithm: &str) -> JwtArgs {
    JwtArgs {
        jwt_algorithm: algorithm.into(),
        jwt_secret: None,
        jwt_private_key_file: None,
        jwt_key_id: None,
        jwt_verify_keys: Vec::new(),
        jwt_accepted_algorithms: Vec::new(),
        access_token_lifetime_secs: 300,
        refresh_token_lifetime_secs: 86_400,
        jwt_leeway_secs: 5,
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // A fixed Ed25519 key (reproducible runs), through the PEM files the config reads.
        let ed = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let dir = std::env::temp_dir().join(format!("jwt-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let private = dir.join("ed.pem");
        let public = dir.join("ed.pub.pem");
        let pem = ed.to_pkcs8_pem(LineEnding::LF).expect("pkcs8");
        std::fs::write(&private, pem.as_bytes()).expect("write key");
        let pub_pem = ed
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("spki");
        std::fs::write(&public, pub_pem).expect("write key");

        let mut ed_args = args("EdDSA");
        ed_args.jwt_private_key_file = Some(private);
        ed_args.jwt_key_id = Some("ed-1".into());
        let (ed_keys, _) =
            JwtKeys::from_args(&ed_args, SecretPolicy::RequireConfigured).expect("EdDSA keys");
        let mut hs_args = args("HS256");
        hs_args.jwt_secret = Some("fuzz-secret-0123456789-0123456789-0123456789".into());
        hs_args.jwt_verify_keys = vec![format!("ed-1={}", public.display())];
        let (hs_keys, _) =
            JwtKeys::from_args(&hs_args, SecretPolicy::RequireConfigured).expect("HS256 keys");
        let _ = std::fs::remove_dir_all(&dir);

        let claims = |token_type, user_id, username: &str| Claims {
            token_type,
            exp: 4_102_444_800, // 2100-01-01: never expires during a run.
            iat: 1_700_000_000,
            // None: the committed corpus holds tokens signed with exactly these claims.
            iat_ms: None,
            jti: format!("{user_id:032x}"),
            user_id,
            username: username.into(),
            is_staff: false,
        };
        let tokens = [
            (&hs_keys, claims(TokenType::Access, 1, "alice")),
            (&ed_keys, claims(TokenType::Access, 2, "bob")),
            (&hs_keys, claims(TokenType::Refresh, 3, "carol")),
        ]
        .into_iter()
        .map(|(keys, claims)| (keys.signing.sign(&claims).expect("sign"), claims))
        .collect::<Vec<_>>();
        for (token, claims) in &tokens {
            assert_eq!(
                hs_keys.verification.verify_untyped(token).as_ref(),
                Ok(claims)
            );
        }
        Fixture {
            keys: hs_keys.verification,
            tokens,
        }
    })
}

fn signed_part(token: &str) -> Option<&str> {
    token.rsplit_once('.').map(|(signed, _)| signed)
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let Some((&first, ops)) = data.split_first() else {
        return;
    };
    let text = if first & 0x80 != 0 {
        String::from_utf8_lossy(ops).into_owned()
    } else {
        // Edits of a genuine token, 4 bytes each: operation, position (16 bits), value.
        let mut token = fixture.tokens[usize::from(first) % 3]
            .0
            .clone()
            .into_bytes();
        for op in ops.chunks_exact(4) {
            let pos = usize::from(u16::from_be_bytes([op[1], op[2]])) % (token.len() + 1);
            let b64 = B64URL[usize::from(op[3]) % 64];
            match op[0] % 6 {
                0 if pos < token.len() => token[pos] ^= op[3].max(1),
                1 if pos < token.len() => token[pos] = b64,
                2 => token.insert(pos, b64),
                3 if pos < token.len() => _ = token.remove(pos),
                4 => token.truncate(pos),
                5 => {
                    // Segment `i` of this token replaced by segment `i` of a genuine token.
                    let other = &fixture.tokens[usize::from(op[3]) % 3].0;
                    let i = usize::from(op[1]) % 3;
                    let mut parts: Vec<Vec<u8>> =
                        token.split(|&b| b == b'.').map(<[u8]>::to_vec).collect();
                    if let (Some(part), Some(theirs)) = (parts.get_mut(i), other.split('.').nth(i))
                    {
                        *part = theirs.as_bytes().to_vec();
                    }
                    token = parts.join(&b'.');
                }
                _ => {}
            }
        }
        String::from_utf8_lossy(&token).into_owned()
    };

    let untyped = fixture.keys.verify_untyped(&text);
    if let Ok(claims) = &untyped {
        let genuine = fixture
            .tokens
            .iter()
            .find(|(token, _)| signed_part(token) == signed_part(&text));
        assert!(
            matches!(genuine, Some((_, expected)) if expected == claims),
            "accepted {text:?} with claims {claims:?}"
        );
    }
    match (fixture.keys.verify(&text, TokenType::Access), untyped) {
        (Ok(typed), Ok(untyped)) => assert_eq!(typed, untyped),
        (Err(TokenError::WrongType { found, .. }), Ok(untyped)) => {
            assert_eq!(found, untyped.token_type);
            assert_eq!(found, TokenType::Refresh);
        }
        (Err(typed), Err(untyped)) => assert_eq!(typed, untyped),
        (typed, untyped) => panic!("verify {typed:?} but verify_untyped {untyped:?}"),
    }
});
