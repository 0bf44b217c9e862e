"""The teacher cache: its Arrow schema and manifest (`schema`), the sharded reader and writer (`store`), `dskd cache
inspect / verify` (`verify`), what stage 1 computes per row (`teacher`), and stage 2's batches of cached rows
(`batch`)."""
