"""python -m minillama.course.corpora --out data/corpora --seed 0"""

from .write import main

main()
