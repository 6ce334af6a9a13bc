"""Differential privacy at a site: ε accounting over Opacus' accountants
(:mod:`moma_core.privacy.accounting`) and the site's own privacy ledger
(:mod:`moma_core.privacy.ledger`)."""

from moma_core.privacy.accounting import (
    DPStep,
    default_delta,
    epsilon,
    noise_for_target_epsilon,
)
from moma_core.privacy.ledger import (
    BudgetCheck,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    ledger_table,
    print_ledger,
)

__all__ = ["BudgetCheck", "DPStep", "LedgerEntry", "LedgerError", "PrivacyLedger",
           "default_delta", "epsilon", "ledger_table", "noise_for_target_epsilon",
           "print_ledger"]
