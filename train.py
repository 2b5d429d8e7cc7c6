"""Train multitask BERT: `python train.py [group=option ...]`; see README.md."""

import hydra

import mtbert.run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg):
    return mtbert.run.main(cfg)


if __name__ == "__main__":
    main()
