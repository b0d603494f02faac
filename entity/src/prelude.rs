//! Each table's `Entity` under the table's name (`Warehouse`, `Product`,
//! `StockLevel`, `Movement`), as `sea-orm-cli generate entity` lays it out.

pub use crate::movement::{Entity as Movement, MovementKind};
pub use crate::product::Entity as Product;
pub use crate::stock_level::Entity as StockLevel;
pub use crate::warehouse::Entity as Warehouse;
