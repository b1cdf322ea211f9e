"""Duplicate cases: the rule (:mod:`~domain.cases.rules`), finding them
(:mod:`~domain.cases.detection`), every status change (:mod:`~domain.cases.lifecycle`),
sending refunds (:mod:`~domain.cases.refunds`), the reasons people read
(:mod:`~domain.cases.reasons`) and what finance sees and decides
(:mod:`~domain.cases.review`)."""
