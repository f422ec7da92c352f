"""DeepDosimetrics library, by pipeline stage: runtime, data, features, deep, analysis, mrml, review, commands.

See DEVELOPING.md ("Layout") for where each piece lives; lower stages never import higher ones.
"""

__version__ = '0.1.0'
