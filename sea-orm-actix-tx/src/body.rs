//! The request body, read into memory once (bounded by the body limit) so that a re-run
//! attempt hands the handler the same bytes again.

use actix_web::dev::Payload;
use actix_web::web::{Bytes, BytesMut};
use futures_util::StreamExt;

use crate::Error;

/// Reads the whole body into memory, refusing more than `limit` bytes (413).
pub async fn read_body(payload: &mut Payload, limit: usize) -> Result<Bytes, Error> {
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| Error::BodyUnreadable)?;
        if body.len() + chunk.len() > limit {
            return Err(Error::PayloadTooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}
