from mtbert.bench.speed import main

main()
