-- W1 as pgbench sends it: the transaction the app runs for GET /products/{id}.
-- Connections carry default_transaction_isolation=repeatable read (PGOPTIONS, as the app's
-- startup parameter), so this BEGIN runs REPEATABLE READ, READ ONLY, like the app's.
\set id random(:pmin, :pmax)
\set lim 1
BEGIN READ ONLY;
SELECT "product"."id", "product"."sku", "product"."name", "product"."created_at" FROM "product" WHERE "product"."id" = :id LIMIT :lim;
COMMIT;
