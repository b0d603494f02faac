//! Tests of url.rs.

use super::*;
