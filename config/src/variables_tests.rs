//! Tests of variables.rs.

use super::*;
