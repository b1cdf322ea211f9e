"""Taking payment once per order: the pay endpoint's service (:mod:`~domain.payments.service`),
Checkout Sessions (:mod:`~domain.payments.checkout`), replays of idempotent requests
(:mod:`~domain.payments.idempotency`) and client secrets sealed at rest
(:mod:`~domain.payments.sealing`)."""
