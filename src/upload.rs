//! Uploaded images, read defensively: the format comes from the file's magic bytes (PNG, JPEG
//! or WebP; never the client's content type or file name), the dimensions from its header
//! before anything is decoded (a few hundred bytes may claim a gigapixel: a decompression
//! bomb), and the decode itself runs under `image`'s limits. Every failure is a message for
//! a 400, never a panic.

use std::io::Cursor;

use image::{ImageFormat, ImageReader, Limits};

/// The largest upload accepted by `/v1/images/edits`, in bytes (larger bodies get 413).
pub const MAX_UPLOAD_BYTES: usize = 20 << 20;
/// The most pixels an uploaded image may have (4096 x 4096), whatever the model's limits:
/// it is decoded at its own size before being resized.
pub const MAX_UPLOAD_PIXELS: u64 = 4096 * 4096;
/// The longest side an uploaded image may have.
pub const MAX_UPLOAD_SIDE: u32 = 16384;

/// The formats an upload may be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadFormat {
    Png,
    Jpeg,
    WebP,
}

impl UploadFormat {
    pub fn name(self) -> &'static str {
        match self {
            UploadFormat::Png => "PNG",
            UploadFormat::Jpeg => "JPEG",
            UploadFormat::WebP => "WebP",
        }
    }

    fn image_format(self) -> ImageFormat {
        match self {
            UploadFormat::Png => ImageFormat::Png,
            UploadFormat::Jpeg => ImageFormat::Jpeg,
            UploadFormat::WebP => ImageFormat::WebP,
        }
    }
}

/// Why an upload was refused: the message names what is wrong and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    #[error("the image is empty")]
    Empty,
    #[error("the image is not PNG, JPEG or WebP (it looks like {0}); upload a PNG, JPEG or WebP file")]
    UnsupportedFormat(&'static str),
    #[error("the {format} image's header could not be read (truncated or corrupt?): {message}")]
    BadHeader { format: &'static str, message: String },
    #[error(
        "the image is {width}x{height} ({pixels} pixels); uploads may have at most {max_pixels} pixels \
         and {max_side} pixels a side"
    )]
    TooManyPixels { width: u32, height: u32, pixels: u64, max_pixels: u64, max_side: u32 },
    #[error("the {format} image could not be decoded (truncated or corrupt?): {message}")]
    Corrupt { format: &'static str, message: String },
}

/// A decoded upload: 8-bit RGB (an alpha channel is dropped), rows top to bottom.
#[derive(Debug, Clone)]
pub struct DecodedUpload {
    pub format: UploadFormat,
    pub image: image::RgbImage,
}

/// The format of `bytes` from its magic bytes.
pub fn sniff(bytes: &[u8]) -> Result<UploadFormat, UploadError> {
    if bytes.is_empty() {
        return Err(UploadError::Empty);
    }
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Ok(UploadFormat::Png);
    }
    if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        return Ok(UploadFormat::Jpeg);
    }
    if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return Ok(UploadFormat::WebP);
    }
    Err(UploadError::UnsupportedFormat(describe(bytes)))
}

/// What a refused file looks like, for the message.
fn describe(bytes: &[u8]) -> &'static str {
    let starts = |m: &[u8]| bytes.starts_with(m);
    if starts(b"GIF87a") || starts(b"GIF89a") {
        "GIF"
    } else if starts(b"BM") {
        "BMP"
    } else if starts(b"II*\0") || starts(b"MM\0*") {
        "TIFF"
    } else if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        "HEIF/AVIF or another ISO media file"
    } else if starts(b"%PDF") {
        "PDF"
    } else if starts(b"<") || bytes.iter().take(512).all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace()) {
        "text"
    } else {
        "an unknown format"
    }
}

/// The dimensions `bytes` claims, read from its header only (a few dozen bytes; nothing is
/// decoded, and `image`'s readers would want more of the file than the header).
pub fn dimensions(bytes: &[u8], format: UploadFormat) -> Result<(u32, u32), UploadError> {
    let found = match format {
        UploadFormat::Png => png_dimensions(bytes),
        UploadFormat::Jpeg => jpeg_dimensions(bytes),
        UploadFormat::WebP => webp_dimensions(bytes),
    };
    found.map_err(|message| UploadError::BadHeader { format: format.name(), message: message.to_string() })
}

fn be16(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?)))
}

fn le16(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?)))
}

fn le24(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 3)?;
    Some(u32::from(s[0]) | (u32::from(s[1]) << 8) | (u32::from(s[2]) << 16))
}

/// The first chunk of a PNG is IHDR: width and height, big-endian, at bytes 16..24.
fn png_dimensions(b: &[u8]) -> Result<(u32, u32), &'static str> {
    if b.len() < 24 {
        return Err("unexpected end of file in the header");
    }
    if &b[12..16] != b"IHDR" {
        return Err("the first chunk is not IHDR");
    }
    let w = u32::from_be_bytes([b[16], b[17], b[18], b[19]]);
    let h = u32::from_be_bytes([b[20], b[21], b[22], b[23]]);
    Ok((w, h))
}

/// Walks the JPEG's marker segments to the first start-of-frame (SOFn): its height and width.
fn jpeg_dimensions(b: &[u8]) -> Result<(u32, u32), &'static str> {
    const EOF: &str = "unexpected end of file before the frame header";
    let mut i = 2;
    loop {
        // Markers may be preceded by fill bytes (0xFF).
        while b.get(i) == Some(&0xff) && b.get(i + 1) == Some(&0xff) {
            i += 1;
        }
        if *b.get(i).ok_or(EOF)? != 0xff {
            return Err("a marker was expected");
        }
        let marker = *b.get(i + 1).ok_or(EOF)?;
        i += 2;
        match marker {
            // Markers without a length.
            0x01 | 0xd0..=0xd7 => continue,
            0xd8..=0xda => return Err("no frame header before the image data"),
            _ => {}
        }
        let len = be16(b, i).ok_or(EOF)? as usize;
        if len < 2 {
            return Err("a segment length is invalid");
        }
        let sof = matches!(marker, 0xc0..=0xc3 | 0xc5..=0xc7 | 0xc9..=0xcb | 0xcd..=0xcf);
        if sof {
            let (h, w) = (be16(b, i + 3).ok_or(EOF)?, be16(b, i + 5).ok_or(EOF)?);
            return Ok((w, h));
        }
        i += len;
    }
}

/// RIFF/WEBP: the first chunk is VP8 (lossy), VP8L (lossless) or VP8X (extended, with the
/// canvas size).
fn webp_dimensions(b: &[u8]) -> Result<(u32, u32), &'static str> {
    const EOF: &str = "unexpected end of file in the header";
    match b.get(12..16).ok_or(EOF)? {
        b"VP8 " => {
            if b.get(23..26).ok_or(EOF)? != [0x9d, 0x01, 0x2a] {
                return Err("the VP8 frame start code is missing");
            }
            Ok((le16(b, 26).ok_or(EOF)? & 0x3fff, le16(b, 28).ok_or(EOF)? & 0x3fff))
        }
        b"VP8L" => {
            if *b.get(20).ok_or(EOF)? != 0x2f {
                return Err("the VP8L signature is missing");
            }
            let s = b.get(21..25).ok_or(EOF)?;
            let bits = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            Ok(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1))
        }
        b"VP8X" => Ok((le24(b, 24).ok_or(EOF)? + 1, le24(b, 27).ok_or(EOF)? + 1)),
        _ => Err("the first chunk is not VP8, VP8L or VP8X"),
    }
}

/// Checks the header's dimensions against `max_pixels` (and `MAX_UPLOAD_SIDE`), then decodes
/// under matching limits.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<DecodedUpload, UploadError> {
    let format = sniff(bytes)?;
    let (width, height) = dimensions(bytes, format)?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 || pixels > max_pixels || width > MAX_UPLOAD_SIDE || height > MAX_UPLOAD_SIDE {
        if pixels == 0 {
            return Err(UploadError::BadHeader { format: format.name(), message: format!("{width}x{height}") });
        }
        return Err(UploadError::TooManyPixels { width, height, pixels, max_pixels, max_side: MAX_UPLOAD_SIDE });
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format.image_format());
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // The decoded buffer (at most 16-bit RGBA) plus the decoder's own working memory.
    limits.max_alloc = Some(pixels * 8 + (64 << 20));
    reader.limits(limits);
    let decoded =
        reader.decode().map_err(|e| UploadError::Corrupt { format: format.name(), message: e.to_string() })?;
    Ok(DecodedUpload { format, image: decoded.into_rgb8() })
}

/// `image` resized to `width` x `height` (Lanczos3; unchanged when already that size).
pub fn resize(image: image::RgbImage, width: u32, height: u32) -> image::RgbImage {
    if image.dimensions() == (width, height) {
        return image;
    }
    image::imageops::resize(&image, width, height, image::imageops::FilterType::Lanczos3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_webp(img: &image::RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut out)
            .encode(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
            .unwrap();
        out
    }

    fn encode(img: &image::RgbImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn gradient(w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 128]))
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    /// A PNG signature and a valid IHDR chunk claiming `w` x `h` RGB8, then nothing.
    pub(crate) fn png_header(w: u32, h: u32) -> Vec<u8> {
        let mut body = b"IHDR".to_vec();
        body.extend_from_slice(&w.to_be_bytes());
        body.extend_from_slice(&h.to_be_bytes());
        body.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32(&body).to_be_bytes());
        png
    }

    #[test]
    fn crc_matches_the_png_reference() {
        assert_eq!(crc32(b"IEND"), 0xae42_6082);
    }

    #[test]
    fn small_png_and_jpeg_decode() {
        let img = gradient(12, 8);
        let png = encode(&img, ImageFormat::Png);
        let d = decode(&png, MAX_UPLOAD_PIXELS).unwrap();
        assert_eq!(d.format, UploadFormat::Png);
        assert_eq!(d.image, img, "PNG is lossless");
        let jpeg = encode(&img, ImageFormat::Jpeg);
        let d = decode(&jpeg, MAX_UPLOAD_PIXELS).unwrap();
        assert_eq!((d.format, d.image.dimensions()), (UploadFormat::Jpeg, (12, 8)));
        let webp = encode_webp(&img);
        let d = decode(&webp, MAX_UPLOAD_PIXELS).unwrap();
        assert_eq!(d.format, UploadFormat::WebP);
        assert_eq!(d.image, img, "lossless WebP");
    }

    #[test]
    fn headers_give_the_dimensions_without_decoding() {
        let img = gradient(300, 7);
        for (bytes, format) in [
            (encode(&img, ImageFormat::Png), UploadFormat::Png),
            (encode(&img, ImageFormat::Jpeg), UploadFormat::Jpeg),
            (encode_webp(&img), UploadFormat::WebP),
        ] {
            assert_eq!(dimensions(&bytes, format).unwrap(), (300, 7), "{format:?}");
            // Only the header is needed: what follows may be missing.
            let head = &bytes[..bytes.len().min(if format == UploadFormat::Jpeg { 700 } else { 40 })];
            assert_eq!(dimensions(head, format).unwrap(), (300, 7), "{format:?} header only");
            for cut in [3, 10, 15] {
                assert!(dimensions(&bytes[..cut], format).is_err(), "{format:?} cut at {cut}");
            }
        }
        // A JPEG claiming 60000x50000 in its frame header, with no image data.
        let mut jpeg = vec![0xff, 0xd8, 0xff, 0xe0, 0x00, 0x04, 0x4a, 0x46];
        jpeg.extend_from_slice(&[0xff, 0xc0, 0x00, 0x0b, 0x08, 0xc3, 0x50, 0xea, 0x60, 0x01, 0x01, 0x11, 0x00]);
        assert_eq!(dimensions(&jpeg, UploadFormat::Jpeg).unwrap(), (60000, 50000));
        let e = decode(&jpeg, MAX_UPLOAD_PIXELS).unwrap_err();
        assert!(matches!(e, UploadError::TooManyPixels { .. }), "{e:?}");
    }

    #[test]
    fn truncated_png_is_an_error() {
        let png = encode(&gradient(64, 64), ImageFormat::Png);
        for cut in [8, 20, png.len() / 2, png.len() - 13] {
            let e = decode(&png[..cut], MAX_UPLOAD_PIXELS).unwrap_err();
            assert!(e.to_string().contains("truncated or corrupt"), "{e}");
            assert!(matches!(e, UploadError::BadHeader { .. } | UploadError::Corrupt { .. }), "cut at {cut}: {e:?}");
        }
    }

    #[test]
    fn a_header_claiming_a_huge_image_is_refused_before_decoding() {
        let bomb = png_header(100_000, 100_000);
        assert_eq!(dimensions(&bomb, UploadFormat::Png).unwrap(), (100_000, 100_000));
        let e = decode(&bomb, MAX_UPLOAD_PIXELS).unwrap_err();
        assert!(matches!(e, UploadError::TooManyPixels { width: 100_000, height: 100_000, .. }), "{e:?}");
        assert!(e.to_string().contains("100000x100000"), "{e}");
        // Within the side limit but over the caller's pixel budget.
        let e = decode(&png_header(300, 300), 256 * 256).unwrap_err();
        assert!(matches!(e, UploadError::TooManyPixels { .. }), "{e:?}");
    }

    #[test]
    fn other_formats_are_named_and_refused() {
        let gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";
        let e = decode(gif, MAX_UPLOAD_PIXELS).unwrap_err();
        assert_eq!(e, UploadError::UnsupportedFormat("GIF"));
        assert!(e.to_string().contains("PNG, JPEG or WebP"), "{e}");
        assert_eq!(sniff(b"hello, world\n").unwrap_err(), UploadError::UnsupportedFormat("text"));
        assert_eq!(sniff(b"").unwrap_err(), UploadError::Empty);
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 ").unwrap(), UploadFormat::WebP);
    }

    #[test]
    fn resizing_reaches_the_target_size() {
        let img = gradient(40, 30);
        assert_eq!(resize(img.clone(), 32, 32).dimensions(), (32, 32));
        assert_eq!(resize(img.clone(), 40, 30), img);
    }
}
