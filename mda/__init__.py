"""mda: Mechanistic Data Attribution — which training samples made this unit form?"""

__version__ = "0.1.0"
