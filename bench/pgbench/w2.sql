-- W2 as pgbench sends it: the transaction the app runs for POST /transfers (quantity 1, a random
-- product, two random distinct warehouses), statement for statement.
\set pid random(:pmin, :pmax)
\set nw :wmax - :wmin + 1
\set from random(:wmin, :wmax)
\set to :wmin + (:from - :wmin + random(1, :nw - 1)) % :nw
\set qty 1
BEGIN ISOLATION LEVEL READ COMMITTED;
INSERT INTO "stock_level" ("warehouse_id", "product_id", "quantity", "updated_at") SELECT "w"."id", "p"."id", 0, :at FROM "warehouse" AS "w" JOIN "product" AS "p" ON "p"."id" = :pid WHERE "w"."id" IN (:from, :to) ORDER BY "w"."id" ON CONFLICT ("warehouse_id", "product_id") DO UPDATE SET "quantity" = "stock_level"."quantity";
UPDATE "stock_level" SET "quantity" = "quantity" - :qty, "updated_at" = :at WHERE "stock_level"."warehouse_id" = :from AND "stock_level"."product_id" = :pid AND "stock_level"."quantity" >= :qty;
INSERT INTO "stock_level" ("warehouse_id", "product_id", "quantity", "updated_at") VALUES (:to, :pid, :qty, :at) ON CONFLICT ("warehouse_id", "product_id") DO UPDATE SET "quantity" = "stock_level"."quantity" + :qty, "updated_at" = :at;
INSERT INTO "movement" ("kind", "product_id", "from_warehouse_id", "to_warehouse_id", "quantity", "created_at") VALUES (:kind, :pid, :from, :to, :qty, :at) RETURNING "id", "kind", "product_id", "from_warehouse_id", "to_warehouse_id", "quantity", "created_at";
COMMIT;
