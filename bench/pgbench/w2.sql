-- W2 as pgbench sends it: the transaction the app runs for POST /transfers (quantity 1, a random
-- product, two random distinct warehouses), statement for statement.
\set pid random(:pmin, :pmax)
\set nw :wmax - :wmin + 1
\set from random(:wmin, :wmax)
\set to :wmin + (:from - :wmin + random(1, :nw - 1)) % :nw
\set qty 1
BEGIN ISOLATION LEVEL READ COMMITTED;
SELECT "stock_level"."warehouse_id" FROM "stock_level" WHERE "stock_level"."product_id" = :pid AND "stock_level"."warehouse_id" IN (:from, :to) ORDER BY "stock_level"."warehouse_id" ASC FOR UPDATE;
UPDATE "stock_level" SET "quantity" = "quantity" - :qty, "updated_at" = :at WHERE "stock_level"."warehouse_id" = :from AND "stock_level"."product_id" = :pid AND "stock_level"."quantity" >= :qty;
INSERT INTO "stock_level" ("warehouse_id", "product_id", "quantity", "updated_at") VALUES (:to, :pid, :qty, :at) ON CONFLICT ("warehouse_id", "product_id") DO UPDATE SET "quantity" = "stock_level"."quantity" + :qty, "updated_at" = :at;
INSERT INTO "movement" ("kind", "product_id", "from_warehouse_id", "to_warehouse_id", "quantity", "created_at") VALUES (:kind, :pid, :from, :to, :qty, :at) RETURNING "id", "kind", "product_id", "from_warehouse_id", "to_warehouse_id", "quantity", "created_at";
COMMIT;
