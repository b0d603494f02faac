//! SeaORM entities of the inventory ledger: one module per table, mapping
//! columns and relations only. The schema itself is owned by the `migration`
//! crate and the rules that keep the ledger consistent live in the app's
//! domain modules; nothing here has behaviour.

pub mod movement;
pub mod prelude;
pub mod product;
pub mod stock_level;
pub mod warehouse;

pub use movement::MovementKind;
