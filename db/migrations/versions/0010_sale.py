"""A sale: supply reserved at intake, a per-payer limit, a window, quantities and refunds

Every item holds `quantity` mints of the supply from intake until it fails or is refunded;
`sale_supply` counts what the held items hold. The rules are the database's own: a trigger on
`mint_queue` reserves a new item's quantity in the same statement that inserts it, refusing it
(SQLSTATE class MQ) outside the sale window, past `max_quantity`, past the payer's
`max_per_payer` or past `max_supply`; and it gives the quantity back when an item stops holding
it, whichever code path (or plain UPDATE) moves it. An item put back in the queue (a retry,
money that arrived after its item failed) holds its quantity again without the rules: it is
paid for already, and the token's own cap has the last word.

The sale's settings are `system_settings` rows like the others, checked by constraints so that
the trigger can read them without a parse error; '' means no limit.

Refunds: what an item's payer is owed back (`refund_amount`, atomic USDC) and how far its
refund got. Another trigger sets what is owed when an item's status becomes final, on every
path: a completed item owes what was paid beyond `quantity * price` (the price it was bought
at); a failed or refunded one whose money moved (`payment_tx_hash` set) owes all of it; an
amount below `refund_min_amount` is dust, recorded and never sent. A batch transaction is a
mint batch or a refund batch (`batch_mints.kind`).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

HOLDING = "('pending', 'processing', 'completed')"

SALE_SETTINGS = [
    ("max_supply", "", "Mints the sale may sell in all ('' for no limit)", "^([0-9]{1,18})?$"),
    ("max_per_payer", "", "Mints one payer may hold ('' for no limit)", "^([1-9][0-9]{0,17})?$"),
    ("max_quantity", "1", "Mints one payment may buy", "^[1-9][0-9]{0,5}$"),
    ("sale_starts_at", "", "When the sale opens, ISO 8601 ('' for already open)", None),
    ("sale_ends_at", "", "When the sale closes, ISO 8601 ('' for never)", None),
    (
        "refund_min_amount",
        "10000",
        "Refunds below this (atomic USDC) are dust: not sent",
        "^[0-9]{1,18}$",
    ),
]

# The supply held is counted on SHARDS rows, each item on the one its payment id hashes to, so
# that concurrent intake does not queue on one row lock. Under a cap each shard has a quota, and
# the quotas add up to max_supply: a shard that runs short takes spare quota from the others
# (sale_rebalance locks every shard, in order, to move it). Supply given back is written to
# sale_supply_releases, which takes no shard's lock (a transaction that fails many items locks
# no shards in an order of its own), and folded into the shards by sale_rebalance.
SHARDS = 16

SALE_FUNCTION = f"""
CREATE FUNCTION mint_queue_shard(payment_id text) RETURNS smallint
LANGUAGE sql IMMUTABLE AS $$ SELECT (hashtext(payment_id) & {SHARDS - 1})::smallint $$;

CREATE FUNCTION sale_rebalance(short_shard smallint, needed bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    cap bigint := (SELECT NULLIF(value, '')::bigint FROM system_settings
                   WHERE key = 'max_supply');
    spare bigint;
    lacking bigint;
    lender record;
    lent bigint;
BEGIN
    -- One rebalance at a time, then every shard in order.
    PERFORM pg_advisory_xact_lock(hashtext('mintq.sale_rebalance'));
    PERFORM 1 FROM sale_supply ORDER BY shard FOR UPDATE;
    WITH gone AS (DELETE FROM sale_supply_releases RETURNING shard, quantity)
    UPDATE sale_supply SET reserved = reserved - g.quantity
    FROM (SELECT shard, sum(quantity) AS quantity FROM gone GROUP BY shard) AS g
    WHERE sale_supply.shard = g.shard;
    IF cap IS NULL THEN
        UPDATE sale_supply SET quota = NULL;
        RETURN true;
    END IF;
    IF short_shard IS NULL OR EXISTS (SELECT 1 FROM sale_supply WHERE quota IS NULL) THEN
        -- The cap changed (or was just set): share what is left evenly.
        spare := GREATEST(cap - (SELECT sum(reserved) FROM sale_supply), 0);
        UPDATE sale_supply SET quota = reserved + spare / {SHARDS}
            + CASE WHEN shard < spare % {SHARDS} THEN 1 ELSE 0 END;
        IF short_shard IS NULL THEN
            RETURN true;
        END IF;
    END IF;
    -- Lend the short shard what it lacks, from the quota no shard holds and then from the
    -- shards with the most unused quota; quota another shard is using stays where it is.
    lacking := needed - (SELECT quota - reserved FROM sale_supply WHERE shard = short_shard);
    IF lacking <= 0 THEN
        RETURN true;
    END IF;
    IF needed > cap - (SELECT sum(reserved) FROM sale_supply) THEN
        RETURN false;  -- less is left than the insert needs
    END IF;
    spare := GREATEST(cap - (SELECT sum(quota) FROM sale_supply), 0);
    lent := LEAST(spare, lacking);
    lacking := lacking - lent;
    FOR lender IN
        SELECT shard, quota - reserved AS unused FROM sale_supply
        WHERE shard <> short_shard AND quota > reserved ORDER BY quota - reserved DESC, shard
    LOOP
        EXIT WHEN lacking <= 0;
        UPDATE sale_supply SET quota = quota - LEAST(lender.unused, lacking)
        WHERE shard = lender.shard;
        lent := lent + LEAST(lender.unused, lacking);
        lacking := lacking - LEAST(lender.unused, lacking);
    END LOOP;
    UPDATE sale_supply SET quota = quota + lent WHERE shard = short_shard;
    RETURN lacking <= 0;
END
$$;

CREATE FUNCTION system_settings_sale() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM sale_rebalance(NULL, 0);
    RETURN NULL;
END
$$;

CREATE FUNCTION mint_queue_sale() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    held_before boolean := TG_OP = 'UPDATE' AND OLD.status IN {HOLDING};
    held_after boolean := NEW.status IN {HOLDING};
    item_shard smallint := mint_queue_shard(NEW.payment_id);
    rules jsonb;
    payer_holds bigint;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.quantity <> OLD.quantity THEN
        RAISE EXCEPTION 'an item''s quantity never changes' USING ERRCODE = 'MQ000';
    END IF;
    IF held_after AND NOT held_before AND NEW.quantity > 0 THEN
        IF TG_OP = 'INSERT' THEN
            SELECT jsonb_object_agg(key, NULLIF(value, '')) INTO rules
            FROM system_settings
            WHERE key IN ('max_supply', 'max_per_payer', 'max_quantity', 'sale_starts_at',
                          'sale_ends_at');
            IF now() < (rules->>'sale_starts_at')::timestamptz THEN
                RAISE EXCEPTION 'sale_not_started' USING ERRCODE = 'MQ001',
                    DETAIL = rules->>'sale_starts_at';
            END IF;
            IF now() >= (rules->>'sale_ends_at')::timestamptz THEN
                RAISE EXCEPTION 'sale_ended' USING ERRCODE = 'MQ002',
                    DETAIL = rules->>'sale_ends_at';
            END IF;
            IF NEW.quantity > COALESCE((rules->>'max_quantity')::bigint, 1) THEN
                RAISE EXCEPTION 'quantity_too_large' USING ERRCODE = 'MQ003',
                    DETAIL = COALESCE(rules->>'max_quantity', '1');
            END IF;
            IF rules->>'max_per_payer' IS NOT NULL THEN
                -- One payer's concurrent payments count one after another.
                PERFORM pg_advisory_xact_lock(hashtextextended(lower(NEW.payer), 1296));
                SELECT COALESCE(sum(quantity), 0) INTO payer_holds FROM mint_queue
                WHERE payer = NEW.payer AND status IN {HOLDING};
                IF payer_holds > (rules->>'max_per_payer')::bigint THEN
                    RAISE EXCEPTION 'payer_limit_reached' USING ERRCODE = 'MQ004',
                        DETAIL = (payer_holds - NEW.quantity)::text;
                END IF;
            END IF;
            UPDATE sale_supply SET reserved = reserved + NEW.quantity
            WHERE shard = item_shard
              AND (quota IS NULL OR reserved + NEW.quantity <= quota);
            IF NOT FOUND THEN
                -- The shard is short: the caller rebalances in a transaction of its own and
                -- tries again. Not here: an UPDATE that waited for the row and then found it
                -- short still holds its lock, and sale_rebalance must lock every shard.
                RAISE EXCEPTION 'shard_short' USING ERRCODE = 'MQ006',
                    DETAIL = item_shard::text;
            END IF;
        ELSE
            UPDATE sale_supply SET reserved = reserved + NEW.quantity
            WHERE shard = item_shard;
        END IF;
    ELSIF held_before AND NOT held_after AND OLD.quantity > 0 THEN
        INSERT INTO sale_supply_releases (shard, quantity) VALUES (item_shard, OLD.quantity);
    END IF;
    RETURN NULL;
END
$$
"""


REFUND_FUNCTION = """
CREATE FUNCTION mint_queue_refund_owed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    owed numeric(78, 0) := 0;
    dust numeric(78, 0);
BEGIN
    IF NEW.refund_status IS NOT NULL
       OR (TG_OP = 'UPDATE' AND NEW.status IS NOT DISTINCT FROM OLD.status) THEN
        RETURN NEW;
    END IF;
    IF NEW.status = 'completed' THEN
        owed := NEW.amount_paid - NEW.quantity * NEW.price;
    ELSIF NEW.status IN ('failed', 'refunded') AND NEW.payment_tx_hash IS NOT NULL THEN
        owed := NEW.amount_paid;
    END IF;
    IF owed > 0 THEN
        SELECT value::numeric INTO dust FROM system_settings WHERE key = 'refund_min_amount';
        NEW.refund_amount := owed;
        NEW.refund_status := CASE WHEN owed < COALESCE(dust, 0) THEN 'dust' ELSE 'pending' END;
    END IF;
    RETURN NEW;
END
$$
"""


def upgrade() -> None:
    op.add_column(
        "mint_queue", sa.Column("quantity", sa.Integer, nullable=False, server_default="1")
    )
    # The price of one mint when it was bought; rows from before were bought at what they paid.
    op.add_column("mint_queue", sa.Column("price", sa.Numeric(78, 0)))
    op.execute("UPDATE mint_queue SET price = amount_paid")
    op.alter_column("mint_queue", "price", nullable=False)
    op.create_check_constraint(op.f("ck_mint_queue_quantity"), "mint_queue", "quantity >= 0")
    op.add_column("mint_queue", sa.Column("refund_amount", sa.Numeric(78, 0)))
    op.add_column("mint_queue", sa.Column("refund_status", sa.String(16)))
    op.add_column("mint_queue", sa.Column("refund_tx_hash", sa.String(66)))
    # Who last signed the refund, valid until when: a new refund wallet must not sign it
    # while the old wallet's signature may still be executed (each wallet has its own nonces).
    op.add_column("mint_queue", sa.Column("refund_wallet", sa.String(42)))
    op.add_column("mint_queue", sa.Column("refund_valid_before", sa.DateTime(timezone=True)))
    op.add_column(
        "mint_queue",
        sa.Column(
            "refund_batch_id",
            UUID(as_uuid=True),
            sa.ForeignKey("batch_mints.batch_id", name="fk_mint_queue_refund_batch_id_batch_mints"),
        ),
    )
    op.create_check_constraint(
        op.f("ck_mint_queue_refund_status"),
        "mint_queue",
        "refund_status IN ('pending', 'sent', 'confirmed', 'dust', 'failed')",
    )
    op.create_check_constraint(
        op.f("ck_mint_queue_refund_amount"),
        "mint_queue",
        "(refund_amount IS NULL) = (refund_status IS NULL) AND refund_amount > 0",
    )
    op.drop_constraint(op.f("ck_mint_queue_status"), "mint_queue", type_="check")
    op.create_check_constraint(
        op.f("ck_mint_queue_status"),
        "mint_queue",
        "status IN ('pending', 'processing', 'completed', 'failed', 'refunded')",
    )
    op.create_index(
        "ix_mint_queue_refunds_due",
        "mint_queue",
        ["updated_at"],
        postgresql_where=sa.text("refund_status = 'pending'"),
    )
    op.create_index("ix_mint_queue_refund_batch_id", "mint_queue", ["refund_batch_id"])

    op.add_column(
        "batch_mints", sa.Column("kind", sa.String(16), nullable=False, server_default="mint")
    )
    op.create_check_constraint(
        op.f("ck_batch_mints_kind"), "batch_mints", "kind IN ('mint', 'refund')"
    )

    op.create_table(
        "sale_supply",
        sa.Column("shard", sa.SmallInteger, nullable=False),
        sa.Column("reserved", sa.BigInteger, nullable=False, server_default="0"),
        # Under a cap, what this shard may hold; NULL: no cap.
        sa.Column("quota", sa.BigInteger),
        sa.CheckConstraint(f"shard >= 0 AND shard < {SHARDS}", name=op.f("ck_sale_supply_shard")),
        sa.PrimaryKeyConstraint("shard", name="pk_sale_supply"),
    )
    op.create_table(
        "sale_supply_releases",
        sa.Column("release_id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("shard", sa.SmallInteger, nullable=False),
        sa.Column("quantity", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("release_id", name="pk_sale_supply_releases"),
    )
    settings = sa.table(
        "system_settings",
        sa.column("key", sa.String),
        sa.column("value", sa.Text),
        sa.column("description", sa.Text),
    )
    op.bulk_insert(
        settings, [{"key": k, "value": v, "description": d} for k, v, d, _ in SALE_SETTINGS]
    )
    for key, _, _, pattern in SALE_SETTINGS:
        valid = (
            f"value ~ '{pattern}'"
            if pattern
            else "value = '' OR value::timestamptz IS NOT NULL"  # a bad one fails the cast
        )
        op.create_check_constraint(
            op.f(f"ck_system_settings_{key}"), "system_settings", f"key <> '{key}' OR {valid}"
        )

    op.drop_constraint(op.f("ck_webhook_deliveries_event"), "webhook_deliveries", type_="check")
    op.create_check_constraint(
        op.f("ck_webhook_deliveries_event"),
        "webhook_deliveries",
        "event IN ('completed', 'failed', 'refunded')",
    )
    op.execute(SALE_FUNCTION)
    op.execute(
        f"INSERT INTO sale_supply (shard, reserved) SELECT s, COALESCE(("
        f"SELECT sum(quantity) FROM mint_queue WHERE status IN {HOLDING} "
        f"AND mint_queue_shard(payment_id) = s), 0) FROM generate_series(0, {SHARDS - 1}) AS s"
    )
    op.execute(
        "CREATE TRIGGER trg_system_settings_sale AFTER INSERT OR UPDATE OF value "
        "ON system_settings FOR EACH ROW WHEN (NEW.key = 'max_supply') "
        "EXECUTE FUNCTION system_settings_sale()"
    )
    op.execute(REFUND_FUNCTION)
    op.execute(
        "CREATE TRIGGER trg_mint_queue_refund_owed BEFORE INSERT OR UPDATE OF status "
        "ON mint_queue FOR EACH ROW EXECUTE FUNCTION mint_queue_refund_owed()"
    )
    op.execute(
        "CREATE TRIGGER trg_mint_queue_sale AFTER INSERT OR UPDATE OF status, quantity "
        "ON mint_queue "
        "FOR EACH ROW EXECUTE FUNCTION mint_queue_sale()"
    )
    op.execute("DROP VIEW queue_stats")
    op.execute(
        """
        CREATE VIEW queue_stats AS
        SELECT
            count(*) FILTER (WHERE status = 'pending') AS pending,
            count(*) FILTER (WHERE status = 'processing') AS processing,
            count(*) FILTER (WHERE status = 'completed') AS completed,
            count(*) FILTER (WHERE status = 'failed') AS failed,
            count(*) FILTER (WHERE status = 'refunded') AS refunded,
            min(created_at) FILTER (WHERE status = 'pending') AS oldest_pending_at,
            (SELECT count(*) FROM batch_mints WHERE status IN ('signed', 'sent'))
                AS batches_in_flight
        FROM mint_queue
        """
    )


def downgrade() -> None:
    op.execute("DROP VIEW queue_stats")
    op.execute(
        """
        CREATE VIEW queue_stats AS
        SELECT
            count(*) FILTER (WHERE status = 'pending') AS pending,
            count(*) FILTER (WHERE status = 'processing') AS processing,
            count(*) FILTER (WHERE status = 'completed') AS completed,
            count(*) FILTER (WHERE status = 'failed') AS failed,
            min(created_at) FILTER (WHERE status = 'pending') AS oldest_pending_at,
            (SELECT count(*) FROM batch_mints WHERE status IN ('signed', 'sent'))
                AS batches_in_flight
        FROM mint_queue
        """
    )
    op.drop_constraint(op.f("ck_webhook_deliveries_event"), "webhook_deliveries", type_="check")
    op.create_check_constraint(
        op.f("ck_webhook_deliveries_event"),
        "webhook_deliveries",
        "event IN ('completed', 'failed')",
    )
    op.execute("DROP TRIGGER trg_mint_queue_refund_owed ON mint_queue")
    op.execute("DROP FUNCTION mint_queue_refund_owed()")
    op.execute("DROP TRIGGER trg_mint_queue_sale ON mint_queue")
    op.execute("DROP FUNCTION mint_queue_sale()")
    op.execute("DROP TRIGGER trg_system_settings_sale ON system_settings")
    op.execute("DROP FUNCTION system_settings_sale()")
    op.execute("DROP FUNCTION sale_rebalance(smallint, bigint)")
    op.execute("DROP FUNCTION mint_queue_shard(text)")
    for key, _, _, _ in SALE_SETTINGS:
        op.drop_constraint(op.f(f"ck_system_settings_{key}"), "system_settings", type_="check")
    keys = ", ".join(f"'{k}'" for k, _, _, _ in SALE_SETTINGS)
    op.execute(f"DELETE FROM system_settings WHERE key IN ({keys})")
    op.drop_table("sale_supply_releases")
    op.drop_table("sale_supply")
    op.drop_constraint(op.f("ck_batch_mints_kind"), "batch_mints", type_="check")
    op.drop_column("batch_mints", "kind")
    op.drop_index("ix_mint_queue_refund_batch_id", table_name="mint_queue")
    op.drop_index("ix_mint_queue_refunds_due", table_name="mint_queue")
    op.drop_constraint(op.f("ck_mint_queue_status"), "mint_queue", type_="check")
    op.create_check_constraint(
        op.f("ck_mint_queue_status"),
        "mint_queue",
        "status IN ('pending', 'processing', 'completed', 'failed')",
    )
    for name in ("refund_amount", "refund_status", "quantity"):
        op.drop_constraint(op.f(f"ck_mint_queue_{name}"), "mint_queue", type_="check")
    for name in (
        "refund_valid_before",
        "refund_wallet",
        "refund_batch_id",
        "refund_tx_hash",
        "refund_status",
        "refund_amount",
        "price",
        "quantity",
    ):
        op.drop_column("mint_queue", name)
