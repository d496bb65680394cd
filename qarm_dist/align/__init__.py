"""Item alignment (QARM): `qarm align train | embed | eval` on Ray Train and Ray Data.

One module per verb (`train`, `infer`, `evaluate`); the tower (`model`) and the loss (`loss`)
import with torch alone.
"""
