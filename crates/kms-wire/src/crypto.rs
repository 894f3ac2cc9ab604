//! Block ciphers and MACs of KMS v4, v5 and v6 (protocol sheet sections 5 and 6).
//!
//! * v4: Rijndael with a 128-bit block and a 160-bit key (Nk = 5, Nr = 11), used only as a
//!   plain CBC-MAC with ISO/IEC 9797-1 padding method 2 ([`v4_mac`]).
//! * v5: stock AES-128 ([`v5_cipher`], backed by [`aes::Aes128`]).
//! * v6: AES-128 whose expanded key has byte 0 of round keys 4, 6 and 8 XORed with
//!   `0x73`, `0x09`, `0xE4` ([`v6_cipher`]).
//!
//! The v4 and v6 ciphers run the AES round function of the `aes` crate's `hazmat` module
//! (AES-NI when available) with key schedules computed here at compile time.
//! All three implement [`BlockCipher`], so the CBC code ([`cbc_encrypt_in_place`],
//! [`cbc_decrypt_in_place`]) is shared; [`cipher_for_major`] picks v5 or v6 the way the
//! reference implementations do.

use std::sync::OnceLock;

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes128, Block};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Cipher block size in bytes (all variants).
pub const BLOCK_LEN: usize = 16;

/// v4 key (160 bits).
pub const K4: [u8; 20] = [
    0x05, 0x3D, 0x83, 0x07, 0xF9, 0xE5, 0xF0, 0x88, 0xEB, 0x5E, 0xA6, 0x68, 0x6C, 0xF0, 0x37, 0xC7,
    0xE4, 0xEF, 0xD2, 0xD6,
];
/// v5 key.
pub const K5: [u8; 16] = [
    0xCD, 0x7E, 0x79, 0x6F, 0x2A, 0xB2, 0x5D, 0xCB, 0x55, 0xFF, 0xC8, 0xEF, 0x83, 0x64, 0xC4, 0x70,
];
/// v6 key.
pub const K6: [u8; 16] = [
    0xA9, 0x4A, 0x41, 0x95, 0xE2, 0x01, 0x43, 0x2D, 0x9B, 0xCB, 0x46, 0x04, 0x05, 0xD8, 0x4A, 0x21,
];

/// The v6 schedule patch: (round key index, XOR constant) applied to byte 0 of that round key.
pub const V6_ROUND_KEY_PATCH: [(usize, u8); 3] = [(4, 0x73), (6, 0x09), (8, 0xE4)];

/// v6 HMAC time-slot constants (section 6.4).
pub const TIME_C1: u64 = 0x0000_0022_8168_89BD;
pub const TIME_C2: u64 = 0x0000_0020_8CBA_B5ED;
pub const TIME_C3: u64 = 0x3156_CD5A_C628_477A;

/// Errors of the CBC / padding helpers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("ciphertext length {0} is not a positive multiple of 16")]
    NotBlockAligned(usize),
    #[error("invalid PKCS#7 padding")]
    BadPadding,
}

/// A 128-bit block cipher with a fixed key.
pub trait BlockCipher: Sync {
    /// Encrypts one block in place (`E_k`).
    fn encrypt_block(&self, block: &mut [u8; 16]);
    /// Decrypts one block in place (`D_k`).
    fn decrypt_block(&self, block: &mut [u8; 16]);
}

// ---------------------------------------------------------------------------------------------
// Key schedules (const fn, so the tables live in the binary and cost nothing at run time).

/// Multiplication in GF(2^8) with the AES polynomial x^8 + x^4 + x^3 + x + 1.
const fn gf_mul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0u8;
    while b != 0 {
        if b & 1 != 0 {
            p ^= a;
        }
        let hi = a & 0x80;
        a <<= 1;
        if hi != 0 {
            a ^= 0x1B;
        }
        b >>= 1;
    }
    p
}

/// The AES S-box, derived from its definition (multiplicative inverse followed by the affine
/// transform) rather than typed in, so a transcription error is impossible.
const SBOX: [u8; 256] = {
    let mut sbox = [0u8; 256];
    let mut x = 0usize;
    while x < 256 {
        // Inverse by exponentiation: x^254 = x^-1 in GF(2^8) (and 0 -> 0).
        let mut inv = 1u8;
        let mut base = x as u8;
        let mut e = 254u32;
        while e != 0 {
            if e & 1 != 0 {
                inv = gf_mul(inv, base);
            }
            base = gf_mul(base, base);
            e >>= 1;
        }
        if x == 0 {
            inv = 0;
        }
        let s = inv
            ^ inv.rotate_left(1)
            ^ inv.rotate_left(2)
            ^ inv.rotate_left(3)
            ^ inv.rotate_left(4)
            ^ 0x63;
        sbox[x] = s;
        x += 1;
    }
    sbox
};

/// Round constants Rcon[1..=10] (index 0 unused).
const RCON: [u8; 11] = [
    0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x1B, 0x36,
];

/// Standard Rijndael key expansion for a 128-bit block: `nk` key words, `R` round keys
/// (`R = Nr + 1`). Valid for nk <= 6 (no extra SubWord step), which covers AES-128 and the
/// 160-bit v4 key. Only ever called in const context with fixed keys.
const fn expand_key<const R: usize>(key: &[u8], nk: usize) -> [[u8; 16]; R] {
    let mut rk = [[0u8; 16]; R];
    let total = 4 * R;
    let mut i = 0;
    // Word w[i] is stored directly in the schedule at rk[i / 4][4 * (i % 4)..].
    while i < total {
        let mut t = [0u8; 4];
        if i < nk {
            t = [key[4 * i], key[4 * i + 1], key[4 * i + 2], key[4 * i + 3]];
        } else {
            let p = i - 1;
            let mut j = 0;
            while j < 4 {
                t[j] = rk[p / 4][4 * (p % 4) + j];
                j += 1;
            }
            if i % nk == 0 {
                // RotWord, SubWord, Rcon.
                t = [
                    SBOX[t[1] as usize] ^ RCON[i / nk],
                    SBOX[t[2] as usize],
                    SBOX[t[3] as usize],
                    SBOX[t[0] as usize],
                ];
            }
            let q = i - nk;
            let mut j = 0;
            while j < 4 {
                t[j] ^= rk[q / 4][4 * (q % 4) + j];
                j += 1;
            }
        }
        let mut j = 0;
        while j < 4 {
            rk[i / 4][4 * (i % 4) + j] = t[j];
            j += 1;
        }
        i += 1;
    }
    rk
}

/// InvMixColumns of one round key (for the equivalent inverse cipher).
const fn inv_mix_columns_const(b: [u8; 16]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut c = 0;
    while c < 4 {
        let a0 = b[4 * c];
        let a1 = b[4 * c + 1];
        let a2 = b[4 * c + 2];
        let a3 = b[4 * c + 3];
        out[4 * c] = gf_mul(a0, 14) ^ gf_mul(a1, 11) ^ gf_mul(a2, 13) ^ gf_mul(a3, 9);
        out[4 * c + 1] = gf_mul(a0, 9) ^ gf_mul(a1, 14) ^ gf_mul(a2, 11) ^ gf_mul(a3, 13);
        out[4 * c + 2] = gf_mul(a0, 13) ^ gf_mul(a1, 9) ^ gf_mul(a2, 14) ^ gf_mul(a3, 11);
        out[4 * c + 3] = gf_mul(a0, 11) ^ gf_mul(a1, 13) ^ gf_mul(a2, 9) ^ gf_mul(a3, 14);
        c += 1;
    }
    out
}

/// AES-128 key expansion (11 round keys).
pub const fn expand_key_aes128(key: &[u8; 16]) -> [[u8; 16]; 11] {
    expand_key::<11>(key, 4)
}

/// v4 key expansion: Rijndael-160 (Nk = 5, Nr = 11, 12 round keys).
pub const fn expand_key_v4(key: &[u8; 20]) -> [[u8; 16]; 12] {
    expand_key::<12>(key, 5)
}

/// v6 key expansion: AES-128 expansion, then the three byte patches of
/// [`V6_ROUND_KEY_PATCH`] on the finished schedule (they do not propagate).
pub const fn expand_key_v6(key: &[u8; 16]) -> [[u8; 16]; 11] {
    let mut rk = expand_key_aes128(key);
    let mut i = 0;
    while i < V6_ROUND_KEY_PATCH.len() {
        let (round, x) = V6_ROUND_KEY_PATCH[i];
        rk[round][0] ^= x;
        i += 1;
    }
    rk
}

// ---------------------------------------------------------------------------------------------
// Rijndael with a 128-bit block and an arbitrary precomputed schedule, on the hazmat rounds.

/// Rijndael (128-bit block) with `R` round keys (`R - 1` rounds), driven by a precomputed
/// schedule. Used for v4 (`R = 12`) and v6 (`R = 11`).
#[derive(Clone, Debug)]
pub struct Rijndael<const R: usize> {
    /// Encryption round keys RK0..RK(R-1).
    enc: [[u8; 16]; R],
    /// InvMixColumns(RKr) for the equivalent inverse cipher (entries 0 and R-1 unused).
    dec: [[u8; 16]; R],
}

impl<const R: usize> Rijndael<R> {
    /// Builds the cipher from a finished key schedule (any patches already applied).
    pub const fn from_round_keys(enc: [[u8; 16]; R]) -> Self {
        let mut dec = [[0u8; 16]; R];
        let mut r = 1;
        while r + 1 < R {
            dec[r] = inv_mix_columns_const(enc[r]);
            r += 1;
        }
        Self { enc, dec }
    }

    /// The encryption round keys, in schedule order.
    pub fn round_keys(&self) -> &[[u8; 16]; R] {
        &self.enc
    }
}

fn xor_block(a: &mut [u8; 16], b: &[u8; 16]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x ^= *y;
    }
}

const ZERO_BLOCK: [u8; 16] = [0u8; 16];

impl<const R: usize> BlockCipher for Rijndael<R> {
    fn encrypt_block(&self, block: &mut [u8; 16]) {
        let Some((first, rest)) = self.enc.split_first() else {
            return;
        };
        let Some((last, middle)) = rest.split_last() else {
            return;
        };
        xor_block(block, first);
        let state = Block::from_mut_slice(block);
        for rk in middle {
            aes::hazmat::cipher_round(state, Block::from_slice(rk));
        }
        // Final round has no MixColumns: run a full round with a zero key, undo MixColumns,
        // then add the last round key.
        aes::hazmat::cipher_round(state, Block::from_slice(&ZERO_BLOCK));
        aes::hazmat::inv_mix_columns(state);
        xor_block(block, last);
    }

    fn decrypt_block(&self, block: &mut [u8; 16]) {
        let Some((first, rest)) = self.enc.split_first() else {
            return;
        };
        let Some((last, _)) = rest.split_last() else {
            return;
        };
        // Middle decryption keys: dec[1..R-1], used from the highest round down.
        let Some((_, dec_rest)) = self.dec.split_first() else {
            return;
        };
        let Some((_, dec_middle)) = dec_rest.split_last() else {
            return;
        };
        xor_block(block, last);
        let state = Block::from_mut_slice(block);
        for dk in dec_middle.iter().rev() {
            aes::hazmat::equiv_inv_cipher_round(state, Block::from_slice(dk));
        }
        // Final inverse round has no InvMixColumns: undo the one the hazmat round applies.
        aes::hazmat::equiv_inv_cipher_round(state, Block::from_slice(&ZERO_BLOCK));
        aes::hazmat::mix_columns(state);
        xor_block(block, first);
    }
}

/// Stock AES-128 (v5).
#[derive(Clone)]
pub struct Aes128Cipher(Aes128);

impl Aes128Cipher {
    pub fn new(key: &[u8; 16]) -> Self {
        Self(Aes128::new(&(*key).into()))
    }
}

impl std::fmt::Debug for Aes128Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Aes128Cipher")
    }
}

impl BlockCipher for Aes128Cipher {
    fn encrypt_block(&self, block: &mut [u8; 16]) {
        self.0.encrypt_block(Block::from_mut_slice(block));
    }
    fn decrypt_block(&self, block: &mut [u8; 16]) {
        self.0.decrypt_block(Block::from_mut_slice(block));
    }
}

/// The v4 cipher (Rijndael-160 with [`K4`]).
pub type V4Cipher = Rijndael<12>;
/// The v6 cipher (patched AES-128 with [`K6`]).
pub type V6Cipher = Rijndael<11>;

static V4: V4Cipher = Rijndael::from_round_keys(expand_key_v4(&K4));
static V6: V6Cipher = Rijndael::from_round_keys(expand_key_v6(&K6));
static V5: OnceLock<Aes128Cipher> = OnceLock::new();

/// The v4 cipher (only its encryption is used by the protocol).
pub fn v4_cipher() -> &'static V4Cipher {
    &V4
}

/// The v5 cipher: stock AES-128 with [`K5`].
pub fn v5_cipher() -> &'static Aes128Cipher {
    V5.get_or_init(|| Aes128Cipher::new(&K5))
}

/// The v6 cipher: modified AES-128 with [`K6`].
pub fn v6_cipher() -> &'static V6Cipher {
    &V6
}

/// The v5/v6 cipher for a message's MajorVersion, as both references choose it:
/// `major > 5` → v6 key and cipher, otherwise v5.
pub fn cipher_for_major(major: u16) -> &'static dyn BlockCipher {
    if major > 5 {
        v6_cipher()
    } else {
        v5_cipher()
    }
}

// ---------------------------------------------------------------------------------------------
// Modes.

/// Single-block `D_k(x)`.
pub fn decrypt_one<C: BlockCipher + ?Sized>(cipher: &C, block: &[u8; 16]) -> [u8; 16] {
    let mut b = *block;
    cipher.decrypt_block(&mut b);
    b
}

/// Single-block `E_k(x)`.
pub fn encrypt_one<C: BlockCipher + ?Sized>(cipher: &C, block: &[u8; 16]) -> [u8; 16] {
    let mut b = *block;
    cipher.encrypt_block(&mut b);
    b
}

/// CBC-encrypts `buf` in place (no padding; its length must be a multiple of 16).
pub fn cbc_encrypt_in_place<C: BlockCipher + ?Sized>(
    cipher: &C,
    iv: &[u8; 16],
    buf: &mut [u8],
) -> Result<(), CryptoError> {
    if !buf.chunks_exact(BLOCK_LEN).remainder().is_empty() {
        return Err(CryptoError::NotBlockAligned(buf.len()));
    }
    let mut prev = *iv;
    for chunk in buf.chunks_exact_mut(BLOCK_LEN) {
        let mut b = [0u8; 16];
        b.copy_from_slice(chunk);
        xor_block(&mut b, &prev);
        cipher.encrypt_block(&mut b);
        chunk.copy_from_slice(&b);
        prev = b;
    }
    Ok(())
}

/// CBC-decrypts `buf` in place (no padding removal; its length must be a multiple of 16).
pub fn cbc_decrypt_in_place<C: BlockCipher + ?Sized>(
    cipher: &C,
    iv: &[u8; 16],
    buf: &mut [u8],
) -> Result<(), CryptoError> {
    if !buf.chunks_exact(BLOCK_LEN).remainder().is_empty() {
        return Err(CryptoError::NotBlockAligned(buf.len()));
    }
    let mut prev = *iv;
    for chunk in buf.chunks_exact_mut(BLOCK_LEN) {
        let mut c = [0u8; 16];
        c.copy_from_slice(chunk);
        let mut p = c;
        cipher.decrypt_block(&mut p);
        xor_block(&mut p, &prev);
        chunk.copy_from_slice(&p);
        prev = c;
    }
    Ok(())
}

/// Appends PKCS#7 padding to the bytes of `buf` after `start` (always 1..=16 bytes).
pub fn pkcs7_pad(buf: &mut Vec<u8>, start: usize) {
    let len = buf.len().saturating_sub(start);
    let pad = BLOCK_LEN - len % BLOCK_LEN;
    // pad is 1..=16, so the cast cannot truncate.
    buf.resize(buf.len() + pad, pad as u8);
}

/// Checks PKCS#7 padding (1..=16 bytes, all equal) and returns the unpadded length.
pub fn pkcs7_unpadded_len(buf: &[u8]) -> Result<usize, CryptoError> {
    let &last = buf.last().ok_or(CryptoError::BadPadding)?;
    let pad = usize::from(last);
    if pad == 0 || pad > BLOCK_LEN || pad > buf.len() {
        return Err(CryptoError::BadPadding);
    }
    let body = buf.len() - pad;
    if buf
        .get(body..)
        .is_some_and(|p| p.iter().all(|&b| b == last))
    {
        Ok(body)
    } else {
        Err(CryptoError::BadPadding)
    }
}

/// CBC + PKCS#7 encryption into a new vector.
pub fn cbc_encrypt_pkcs7<C: BlockCipher + ?Sized>(
    cipher: &C,
    iv: &[u8; 16],
    plaintext: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(plaintext.len() + BLOCK_LEN);
    out.extend_from_slice(plaintext);
    pkcs7_pad(&mut out, 0);
    // Padded to a multiple of 16 just above, so this cannot fail.
    let _ = cbc_encrypt_in_place(cipher, iv, &mut out);
    out
}

/// CBC decryption and PKCS#7 removal into a new vector.
pub fn cbc_decrypt_pkcs7<C: BlockCipher + ?Sized>(
    cipher: &C,
    iv: &[u8; 16],
    ciphertext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    if ciphertext.is_empty() {
        return Err(CryptoError::NotBlockAligned(0));
    }
    let mut out = ciphertext.to_vec();
    cbc_decrypt_in_place(cipher, iv, &mut out)?;
    let len = pkcs7_unpadded_len(&out)?;
    out.truncate(len);
    Ok(out)
}

/// The v4 MAC: CBC-MAC with the v4 cipher, zero IV, ISO/IEC 9797-1 padding method 2
/// (append `0x80`, then zeros to a block boundary; always at least one byte). No CMAC
/// subkey step.
pub fn v4_mac(msg: &[u8]) -> [u8; 16] {
    let cipher = v4_cipher();
    let mut x = [0u8; 16];
    let mut chunks = msg.chunks_exact(BLOCK_LEN);
    for chunk in &mut chunks {
        for (a, b) in x.iter_mut().zip(chunk) {
            *a ^= *b;
        }
        cipher.encrypt_block(&mut x);
    }
    let rest = chunks.remainder();
    let mut last = [0u8; 16];
    last[..rest.len()].copy_from_slice(rest); // rest.len() < 16
    last[rest.len()] = 0x80;
    xor_block(&mut x, &last);
    cipher.encrypt_block(&mut x);
    x
}

// ---------------------------------------------------------------------------------------------
// v6 HMAC.

/// The v6 time slot for FILETIME `t`, shifted by `tolerance` slots the way vlmcsd does
/// (`t / C1 * C2 + C3 + tolerance * C1`, all mod 2^64). A server always uses tolerance 0.
pub fn v6_time_slot(t: u64, tolerance: i8) -> u64 {
    (t / TIME_C1)
        .wrapping_mul(TIME_C2)
        .wrapping_add(TIME_C3)
        .wrapping_add((i64::from(tolerance) as u64).wrapping_mul(TIME_C1))
}

/// The v6 HMAC key: the last 16 bytes of SHA-256 of the time slot (u64 LE).
pub fn v6_hmac_key(t: u64, tolerance: i8) -> [u8; 16] {
    let digest = Sha256::digest(v6_time_slot(t, tolerance).to_le_bytes());
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[16..]);
    key
}

type HmacSha256 = Hmac<Sha256>;

fn hmac_sha256(key: &[u8; 16]) -> HmacSha256 {
    // HMAC zero-pads short keys to the block size, so padding the key ourselves gives the
    // same MAC and lets us use the infallible constructor.
    let mut block_key = [0u8; 64];
    block_key[..16].copy_from_slice(key);
    <HmacSha256 as KeyInit>::new(&block_key.into())
}

/// The v6 HMAC field: `HMAC-SHA256(key, s || body)[16..32]` (the last 16 bytes).
pub fn v6_hmac(key: &[u8; 16], s: &[u8; 16], body: &[u8]) -> [u8; 16] {
    let mut mac = hmac_sha256(key);
    mac.update(s);
    mac.update(body);
    let full = mac.finalize().into_bytes();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[16..]);
    out
}

/// Constant-time check of a v6 HMAC field against `HMAC-SHA256(key, s || body)[16..32]`.
pub fn v6_hmac_verify(key: &[u8; 16], s: &[u8; 16], body: &[u8], tag: &[u8; 16]) -> bool {
    let mut mac = hmac_sha256(key);
    mac.update(s);
    mac.update(body);
    mac.verify_truncated_right(tag).is_ok()
}

/// SHA-256 of a 16-byte salt (`Hash = SHA-256(R)`).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h16(s: &str) -> [u8; 16] {
        let v: Vec<u8> = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect();
        v.try_into().unwrap()
    }

    #[test]
    fn sbox_spot_values() {
        // FIPS-197 figure 7.
        assert_eq!(SBOX[0x00], 0x63);
        assert_eq!(SBOX[0x01], 0x7c);
        assert_eq!(SBOX[0x53], 0xed);
        assert_eq!(SBOX[0xff], 0x16);
    }

    #[test]
    fn fips197_c1_with_hazmat_rijndael_and_stock_aes() {
        let key = h16("000102030405060708090a0b0c0d0e0f");
        let pt = h16("00112233445566778899aabbccddeeff");
        let ct = h16("69c4e0d86a7b0430d8cdb78070b4c55a");
        let ours = Rijndael::<11>::from_round_keys(expand_key_aes128(&key));
        assert_eq!(encrypt_one(&ours, &pt), ct);
        assert_eq!(decrypt_one(&ours, &ct), pt);
        let stock = Aes128Cipher::new(&key);
        assert_eq!(encrypt_one(&stock, &pt), ct);
        assert_eq!(decrypt_one(&stock, &ct), pt);
        // FIPS-197 A.1 last round key for this key.
        assert_eq!(
            ours.round_keys()[10],
            h16("13111d7fe3944a17f307a78b4d2b30c5")
        );
    }

    #[test]
    fn unpatched_schedule_matches_stock_aes_on_many_blocks() {
        let ours = Rijndael::<11>::from_round_keys(expand_key_aes128(&K5));
        let mut b = [0u8; 16];
        for i in 0..200u8 {
            b[usize::from(i % 16)] ^= i.wrapping_mul(37).wrapping_add(11);
            let c = encrypt_one(v5_cipher(), &b);
            assert_eq!(encrypt_one(&ours, &b), c);
            assert_eq!(decrypt_one(&ours, &c), b);
            b = c;
        }
    }

    #[test]
    fn check_values_from_section_13() {
        let z = [0u8; 16];
        assert_eq!(
            encrypt_one(v5_cipher(), &z),
            h16("ec7c7e75b1923978eac4b2d2260235d5")
        );
        assert_eq!(
            encrypt_one(v6_cipher(), &z),
            h16("8ca59de0c483c04aa7026a22d6dd208e")
        );
        assert_eq!(
            encrypt_one(&Aes128Cipher::new(&K6), &z),
            h16("b4c3c015f6fb320c9b64aecd52fa58c8")
        );
        assert_eq!(
            encrypt_one(v4_cipher(), &z),
            h16("933030f10e2e7782b80915d5778a4957")
        );
        assert_eq!(v4_mac(&[]), h16("d144963029e2bd12f9970c9f52b27f09"));
        // Decryption inverts encryption for the hazmat-based ciphers.
        for c in [
            encrypt_one(v6_cipher(), &z),
            h16("0123456789abcdef0123456789abcdef"),
        ] {
            assert_eq!(encrypt_one(v6_cipher(), &decrypt_one(v6_cipher(), &c)), c);
            assert_eq!(encrypt_one(v4_cipher(), &decrypt_one(v4_cipher(), &c)), c);
        }
    }

    #[test]
    fn worked_examples_check_values_and_schedules() {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../../tests/vectors/worked_examples.json"))
                .unwrap();
        let c = &v["cipher_check_values"];
        let hx = |k: &serde_json::Value| h16(k.as_str().unwrap());
        let fips = &c["aes128_fips197_c1"];
        let fips_cipher = Rijndael::<11>::from_round_keys(expand_key_aes128(&hx(&fips["key"])));
        assert_eq!(
            encrypt_one(&fips_cipher, &hx(&fips["plaintext"])),
            hx(&fips["ciphertext"])
        );
        let z = [0u8; 16];
        assert_eq!(
            encrypt_one(v5_cipher(), &z),
            hx(&c["v5_aes128_K5_encrypt_zero_block"])
        );
        assert_eq!(
            encrypt_one(v6_cipher(), &z),
            hx(&c["v6_modified_aes_K6_encrypt_zero_block"])
        );
        assert_eq!(
            encrypt_one(&Aes128Cipher::new(&K6), &z),
            hx(&c["stock_aes128_K6_encrypt_zero_block_(WRONG_for_v6)"])
        );
        assert_eq!(
            encrypt_one(v4_cipher(), &z),
            hx(&c["v4_rijndael160_K4_encrypt_zero_block"])
        );
        assert_eq!(v4_mac(&[]), hx(&c["v4mac_of_empty_message"]));

        let schedule =
            |k: &str| -> Vec<[u8; 16]> { c[k].as_array().unwrap().iter().map(hx).collect() };
        assert_eq!(v4_cipher().round_keys().to_vec(), schedule("v4_round_keys"));
        assert_eq!(expand_key_aes128(&K5).to_vec(), schedule("v5_round_keys"));
        assert_eq!(v6_cipher().round_keys().to_vec(), schedule("v6_round_keys"));
        assert_eq!(schedule("v4_round_keys").len(), 12);
        assert_eq!(schedule("v6_round_keys").len(), 11);
    }

    #[test]
    fn v4_mac_padding_is_method_2() {
        // A 16-byte message gets a whole extra block 80 00..00.
        let m = [0x11u8; 16];
        let mut x = m;
        v4_cipher().encrypt_block(&mut x);
        x[0] ^= 0x80;
        v4_cipher().encrypt_block(&mut x);
        assert_eq!(v4_mac(&m), x);
        // A 3-byte message is one block: m || 80 || zeros.
        let mut b = [0u8; 16];
        b[..3].copy_from_slice(&[1, 2, 3]);
        b[3] = 0x80;
        v4_cipher().encrypt_block(&mut b);
        assert_eq!(v4_mac(&[1, 2, 3]), b);
    }

    #[test]
    fn cbc_pkcs7_round_trip_and_padding_rules() {
        for len in [0usize, 1, 15, 16, 17, 236, 240] {
            let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let iv = [7u8; 16];
            for c in [cipher_for_major(5), cipher_for_major(6)] {
                let ct = cbc_encrypt_pkcs7(c, &iv, &pt);
                assert_eq!(ct.len(), (len / 16 + 1) * 16, "PKCS#7 always pads");
                assert_eq!(cbc_decrypt_pkcs7(c, &iv, &ct).unwrap(), pt);
            }
        }
        assert_eq!(pkcs7_unpadded_len(&[1, 2, 0]), Err(CryptoError::BadPadding));
        assert_eq!(pkcs7_unpadded_len(&[1, 17]), Err(CryptoError::BadPadding));
        assert_eq!(pkcs7_unpadded_len(&[1, 3, 2]), Err(CryptoError::BadPadding));
        assert_eq!(pkcs7_unpadded_len(&[1, 2, 2]), Ok(1));
        assert_eq!(pkcs7_unpadded_len(&[]), Err(CryptoError::BadPadding));
        let mut odd = [0u8; 17];
        assert_eq!(
            cbc_decrypt_in_place(v5_cipher(), &[0; 16], &mut odd),
            Err(CryptoError::NotBlockAligned(17))
        );
    }

    #[test]
    fn cipher_choice_follows_major_version() {
        let z = [0u8; 16];
        let v6 = encrypt_one(v6_cipher(), &z);
        let v5 = encrypt_one(v5_cipher(), &z);
        assert_eq!(encrypt_one(cipher_for_major(6), &z), v6);
        assert_eq!(encrypt_one(cipher_for_major(7), &z), v6);
        assert_eq!(encrypt_one(cipher_for_major(5), &z), v5);
        assert_eq!(encrypt_one(cipher_for_major(3), &z), v5);
    }

    #[test]
    fn time_slot_tolerance_wraps() {
        let t = 134_398_399_720_000_000u64;
        assert_eq!(v6_time_slot(t, 0), 0x3319_379b_820f_f6a5);
        assert_eq!(
            v6_time_slot(t, 1),
            0x3319_379b_820f_f6a5u64.wrapping_add(TIME_C1)
        );
        assert_eq!(
            v6_time_slot(t, -1),
            0x3319_379b_820f_f6a5u64.wrapping_sub(TIME_C1)
        );
        assert_eq!(v6_hmac_key(t, 0), h16("50fd4b414706fc8c05c8c2bdb457a067"));
        // No overflow panic at the extremes.
        let _ = v6_time_slot(u64::MAX, 1);
        let _ = v6_time_slot(0, -1);
    }
}
