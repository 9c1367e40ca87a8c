"""Everything that is not a user interface, in four tiers: ``commands`` > ``migration`` > ``monitor``
> ``hosts``, over the pure ``values``. Never imports textual, prompt_toolkit or rich; this package
module itself imports nothing.
"""
