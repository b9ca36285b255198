"""The data contract of DESIGN §3: file names, columns and their rules.

Pure constants and small pure checks; reading files lives in :mod:`common.data.storefiles`.
"""

from __future__ import annotations

CATALOG_FILE = "catalog.csv"
STORES_DIR = "stores"
STORE_JSON = "store.json"
TRANSACTIONS_FILE = "transactions.csv"
MEMBERS_FILE = "members.csv"

CATALOG_COLUMNS = ("item_id", "name", "category", "brand", "price")
CATALOG_REQUIRED = ("item_id", "category")

TRANSACTION_COLUMNS = (
    "receipt_id",
    "ts",
    "member_id",
    "item_id",
    "quantity",
    "unit_price",
    "promo",
    "channel",
)
TRANSACTION_REQUIRED = ("receipt_id", "ts", "member_id", "item_id", "quantity", "unit_price")

MEMBER_COLUMNS = ("member_id", "join_date", "birth_year", "gender", "tier", "consent_training", "home_store")
MEMBER_REQUIRED = ("member_id", "join_date")

# Profile vocabularies are fixed chain-wide so every store builds the same feature layout.
GENDERS = ("f", "m", "x")
TIERS = ("basic", "silver", "gold", "platinum")
# Upper bounds (exclusive) of the age bands, in years; the last band is open.
AGE_BAND_EDGES = (25, 35, 45, 55, 65)
# Upper bounds (exclusive) of the tenure bands, in days since joining.
TENURE_BAND_EDGES = (90, 365, 730, 1825)
BIRTH_YEAR_RANGE = (1900, 2015)

TRUE_WORDS = frozenset({"true", "yes", "1", "y", "t"})
FALSE_WORDS = frozenset({"false", "no", "0", "n", "f"})


def trains_here(home_store: object, store_id: str) -> bool:
    """Whether a member trains (with DP) at ``store_id``: their ``home_store`` is this store,
    or is not given (the store knows of no other home for them). A member is one person
    across the chain and trains at one store only (DESIGN §4.1)."""
    home = "" if home_store is None else str(home_store).strip()
    return home in ("", str(store_id))


def parse_consent(value: object) -> bool | None:
    """Map a consent cell to True/False, or None when it is not a recognised word."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None
