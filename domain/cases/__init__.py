"""Duplicate cases: the rule (:mod:`~domain.cases.rules`), finding them
(:mod:`~domain.cases.detection`), every status change (:mod:`~domain.cases.lifecycle`),
sending refunds (:mod:`~domain.cases.refunds`), the reasons people read
(:mod:`~domain.cases.reasons`), what finance sees (:mod:`~domain.cases.views`, typed read
models), decides (:mod:`~domain.cases.review`) and exports (:mod:`~domain.cases.report`)."""
