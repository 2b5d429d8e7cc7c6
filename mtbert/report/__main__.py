from mtbert.report import main

main()
