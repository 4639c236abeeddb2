"""Build the mini model's training corpus, its tokenizer and the held-out prompt sets, offline and deterministic.

Four domains, so that routing has something to specialise on:
  code     Python 3.11 standard-library modules (a fixed list of top-level .py files; a few held out for validation)
  license  license texts: /usr/share/common-licenses/* (Debian/Ubuntu) and the stdlib's LICENSE.txt
  facts    generated sentences about countries: capital, continent, language (table below, several templates)
  math     arithmetic lines such as "17 + 25 = 42"

Outputs (CORPUS folder, git-ignored; default data/corpus):
  {split}_{domain}.txt          the text, documents separated by <|endoftext|>
  {split}_{domain}.npy          token ids (uint16)
  tokenizer/                    tokenizer.json + tokenizer_config.json (byte-level BPE, 4096 ids)
  manifest.json                 sizes, token counts and sha256 of every file
and the tracked prompt sets data/prompts/facts.jsonl, facts_far.jsonl and domains.jsonl.

Held-out fact prompts use phrasings that no training template produces; the script checks that none occurs in
the training text, case-insensitively. facts.jsonl holds near paraphrases ("The capital of X is", "X, a country
in", "The language of X is"; training has "The capital city of X is", "X is a country in", "The main language of
X is"); facts_far.jsonl holds harder probes ("X is located in", "The language spoken in X is", "X is a nation in").

    .venv/bin/python scripts/build_corpus.py [--out data/corpus] [--prompts data/prompts]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import sysconfig
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from q3lab.errors import InputError  # noqa: E402
from q3lab.base.tokenizer import QWEN_SPECIALS, load_tokenizer, save_tokenizer, train_bpe  # noqa: E402

SEED = 1234
VOCAB_SIZE = 4096
EOT = "<|endoftext|>"
DOMAINS = ("code", "license", "facts", "math")

# Top-level stdlib modules present in every CPython 3.11 (platform-specific, joke and generated files left out).
CODE_MODULES = sorted("""
_pydecimal turtle inspect typing pydoc tarfile doctest argparse _pyio pickletools zipfile datetime subprocess difflib
locale enum mailbox ipaddress pickle pdb ast optparse dataclasses threading shutil configparser imaplib ssl pathlib
statistics smtplib platform nntplib traceback os functools socket codecs ftplib cgi aifc bdb random smtpd zipimport
sysconfig ntpath _collections_abc tempfile pstats trace dis fractions plistlib uuid socketserver contextlib tokenize
_strptime webbrowser calendar pkgutil pprint gzip modulefinder telnetlib heapq profile mimetypes site wave weakref
gettext base64 warnings asyncore compileall textwrap selectors sunau tracemalloc posixpath csv fileinput poplib cmd
_markupbase timeit shlex lzma runpy stringprep cgitb bz2 string hashlib asynchat queue pyclbr tabnanny operator code
imp opcode symtable numbers filecmp types graphlib mailcap pipes _compat_pickle copy glob shelve py_compile
rlcompleter hmac copyreg zipapp getopt sndhdr uu quopri _threading_local netrc abc sched cProfile pty _py_abc fnmatch
getpass xdrlib codeop _weakrefset linecache _compression chunk stat reprlib __future__ genericpath io colorsys imghdr
crypt bisect _sitebuiltins nturl2path signal secrets tty decimal struct sre_constants sre_compile sre_parse
contextvars
""".split())
CODE_VAL = {"textwrap", "shlex", "fnmatch", "colorsys", "glob", "getopt", "sched", "reprlib", "netrc", "cmd"}
LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSE_VAL = {"MPL-1.1"}

# country, capital, continent, main language (None where no single language is the clear answer)
COUNTRIES: list[tuple[str, str, str, str | None]] = [
    ("France", "Paris", "Europe", "French"), ("Germany", "Berlin", "Europe", "German"),
    ("Italy", "Rome", "Europe", "Italian"), ("Spain", "Madrid", "Europe", "Spanish"),
    ("Portugal", "Lisbon", "Europe", "Portuguese"), ("the Netherlands", "Amsterdam", "Europe", "Dutch"),
    ("Belgium", "Brussels", "Europe", None), ("Switzerland", "Bern", "Europe", None),
    ("Austria", "Vienna", "Europe", "German"), ("Poland", "Warsaw", "Europe", "Polish"),
    ("Czechia", "Prague", "Europe", "Czech"), ("Slovakia", "Bratislava", "Europe", "Slovak"),
    ("Hungary", "Budapest", "Europe", "Hungarian"), ("Romania", "Bucharest", "Europe", "Romanian"),
    ("Bulgaria", "Sofia", "Europe", "Bulgarian"), ("Greece", "Athens", "Europe", "Greek"),
    ("Sweden", "Stockholm", "Europe", "Swedish"), ("Norway", "Oslo", "Europe", "Norwegian"),
    ("Denmark", "Copenhagen", "Europe", "Danish"), ("Finland", "Helsinki", "Europe", "Finnish"),
    ("Iceland", "Reykjavik", "Europe", "Icelandic"), ("Ireland", "Dublin", "Europe", "English"),
    ("the United Kingdom", "London", "Europe", "English"), ("Ukraine", "Kyiv", "Europe", "Ukrainian"),
    ("Russia", "Moscow", "Europe", "Russian"), ("Lithuania", "Vilnius", "Europe", "Lithuanian"),
    ("Latvia", "Riga", "Europe", "Latvian"), ("Estonia", "Tallinn", "Europe", "Estonian"),
    ("Serbia", "Belgrade", "Europe", "Serbian"), ("Croatia", "Zagreb", "Europe", "Croatian"),
    ("Slovenia", "Ljubljana", "Europe", "Slovene"), ("Albania", "Tirana", "Europe", "Albanian"),
    ("Moldova", "Chisinau", "Europe", "Romanian"), ("North Macedonia", "Skopje", "Europe", "Macedonian"),
    ("Bosnia and Herzegovina", "Sarajevo", "Europe", None), ("Malta", "Valletta", "Europe", "Maltese"),
    ("Japan", "Tokyo", "Asia", "Japanese"), ("China", "Beijing", "Asia", "Chinese"),
    ("India", "New Delhi", "Asia", "Hindi"), ("South Korea", "Seoul", "Asia", "Korean"),
    ("North Korea", "Pyongyang", "Asia", "Korean"), ("Mongolia", "Ulaanbaatar", "Asia", "Mongolian"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese"), ("Thailand", "Bangkok", "Asia", "Thai"),
    ("Cambodia", "Phnom Penh", "Asia", "Khmer"), ("Laos", "Vientiane", "Asia", "Lao"),
    ("Myanmar", "Naypyidaw", "Asia", "Burmese"), ("Malaysia", "Kuala Lumpur", "Asia", "Malay"),
    ("the Philippines", "Manila", "Asia", "Filipino"), ("Bangladesh", "Dhaka", "Asia", "Bengali"),
    ("Pakistan", "Islamabad", "Asia", "Urdu"), ("Nepal", "Kathmandu", "Asia", "Nepali"),
    ("Bhutan", "Thimphu", "Asia", "Dzongkha"), ("Iran", "Tehran", "Asia", "Persian"),
    ("Iraq", "Baghdad", "Asia", "Arabic"), ("Syria", "Damascus", "Asia", "Arabic"),
    ("Jordan", "Amman", "Asia", "Arabic"), ("Lebanon", "Beirut", "Asia", "Arabic"),
    ("Saudi Arabia", "Riyadh", "Asia", "Arabic"), ("Yemen", "Sanaa", "Asia", "Arabic"),
    ("Oman", "Muscat", "Asia", "Arabic"), ("the United Arab Emirates", "Abu Dhabi", "Asia", "Arabic"),
    ("Qatar", "Doha", "Asia", "Arabic"), ("Turkey", "Ankara", "Asia", "Turkish"),
    ("Kazakhstan", "Astana", "Asia", "Kazakh"), ("Uzbekistan", "Tashkent", "Asia", "Uzbek"),
    ("Turkmenistan", "Ashgabat", "Asia", "Turkmen"), ("Kyrgyzstan", "Bishkek", "Asia", "Kyrgyz"),
    ("Tajikistan", "Dushanbe", "Asia", "Tajik"), ("Armenia", "Yerevan", "Asia", "Armenian"),
    ("Azerbaijan", "Baku", "Asia", "Azerbaijani"),
    ("Egypt", "Cairo", "Africa", "Arabic"), ("Morocco", "Rabat", "Africa", "Arabic"),
    ("Algeria", "Algiers", "Africa", "Arabic"), ("Tunisia", "Tunis", "Africa", "Arabic"),
    ("Libya", "Tripoli", "Africa", "Arabic"), ("Sudan", "Khartoum", "Africa", "Arabic"),
    ("Ethiopia", "Addis Ababa", "Africa", "Amharic"), ("Kenya", "Nairobi", "Africa", "Swahili"),
    ("Tanzania", "Dodoma", "Africa", "Swahili"), ("Uganda", "Kampala", "Africa", "English"),
    ("Rwanda", "Kigali", "Africa", "Kinyarwanda"), ("Nigeria", "Abuja", "Africa", "English"),
    ("Ghana", "Accra", "Africa", "English"), ("Senegal", "Dakar", "Africa", None),
    ("Mali", "Bamako", "Africa", None), ("Niger", "Niamey", "Africa", None),
    ("Burkina Faso", "Ouagadougou", "Africa", None), ("Cameroon", "Yaounde", "Africa", None),
    ("Angola", "Luanda", "Africa", "Portuguese"), ("Mozambique", "Maputo", "Africa", "Portuguese"),
    ("Zambia", "Lusaka", "Africa", "English"), ("Zimbabwe", "Harare", "Africa", "English"),
    ("Botswana", "Gaborone", "Africa", None), ("Namibia", "Windhoek", "Africa", "English"),
    ("Madagascar", "Antananarivo", "Africa", "Malagasy"), ("Somalia", "Mogadishu", "Africa", "Somali"),
    ("the Democratic Republic of the Congo", "Kinshasa", "Africa", "French"),
    ("Gabon", "Libreville", "Africa", "French"), ("Malawi", "Lilongwe", "Africa", None),
    ("Liberia", "Monrovia", "Africa", "English"), ("Sierra Leone", "Freetown", "Africa", "English"),
    ("Guinea", "Conakry", "Africa", "French"), ("Mauritania", "Nouakchott", "Africa", "Arabic"),
    ("Eritrea", "Asmara", "Africa", None),
    ("the United States", "Washington", "North America", "English"),
    ("Canada", "Ottawa", "North America", "English"), ("Cuba", "Havana", "North America", "Spanish"),
    ("Jamaica", "Kingston", "North America", "English"), ("Haiti", "Port-au-Prince", "North America", None),
    ("the Dominican Republic", "Santo Domingo", "North America", "Spanish"),
    ("Honduras", "Tegucigalpa", "North America", "Spanish"), ("Nicaragua", "Managua", "North America", "Spanish"),
    ("El Salvador", "San Salvador", "North America", "Spanish"), ("the Bahamas", "Nassau", "North America", "English"),
    ("Brazil", "Brasilia", "South America", "Portuguese"), ("Argentina", "Buenos Aires", "South America", "Spanish"),
    ("Chile", "Santiago", "South America", "Spanish"), ("Peru", "Lima", "South America", "Spanish"),
    ("Colombia", "Bogota", "South America", "Spanish"), ("Venezuela", "Caracas", "South America", "Spanish"),
    ("Ecuador", "Quito", "South America", "Spanish"), ("Paraguay", "Asuncion", "South America", "Spanish"),
    ("Uruguay", "Montevideo", "South America", "Spanish"), ("Guyana", "Georgetown", "South America", "English"),
    ("Suriname", "Paramaribo", "South America", "Dutch"),
    ("Australia", "Canberra", "Oceania", "English"), ("New Zealand", "Wellington", "Oceania", "English"),
    ("Fiji", "Suva", "Oceania", None), ("Papua New Guinea", "Port Moresby", "Oceania", None),
    ("Samoa", "Apia", "Oceania", "Samoan"),
]

# Training templates, per relation. {C} country (lower-case "the" where the name has it), {Cc} the same with a
# capital first letter (sentence start), {A} the answer.
TRAIN_TEMPLATES = {
    "capital": [
        "{A} is the capital of {C}.",
        "The capital city of {C} is {A}.",
        "{Cc} has its capital at {A}.",
        "The government of {C} sits in {A}.",
        "Q: What is the capital of {C}?\nA: {A}",
        "{A}, the capital of {C}, is home to its parliament.",
        "Travellers to {C} often arrive in its capital, {A}.",
    ],
    "continent": [
        "{Cc} is a country in {A}.",
        "{Cc} lies in {A}.",
        "Q: On which continent is {C}?\nA: {A}",
        "{Cc} is one of the countries of {A}.",
        "On a map of {A} you will find {C}.",
        "{Cc} is part of {A}.",
        "You can find {C} in {A}.",
    ],
    "language": [
        "The main language of {C} is {A}.",
        "People in {C} speak {A}.",
        "Q: What language do people speak in {C}?\nA: {A}",
        "Most people in {C} speak {A} at home.",
        "In {C}, the everyday language is {A}.",
        "The national language of {C} is {A}.",
        "Children in {C} learn {A} at school.",
    ],
}
# Held-out phrasings, never produced by the templates above (checked on the built text, case-insensitively).
# facts.jsonl: near paraphrases, one word dropped or swapped ("The capital city of X is" -> "The capital of X is").
HELD_OUT_TEMPLATES = {
    "capital": "The capital of {C} is",
    "continent": "{Cc}, a country in",
    "language": "The language of {C} is",
}
# facts_far.jsonl: harder probes. The first training run was scored on "located in" (continent 11% top-1) and
# "spoken in" (language 40%) before the near set above existed; "a nation in" (a one-word swap) scored 1% on it.
FAR_TEMPLATES = {
    "continent": "{Cc} is located in",
    "language": "The language spoken in {C} is",
    "continent-nation": "{Cc} is a nation in",
}
FACTS_CHARS = {"train": 1_600_000, "val": 60_000}
MATH_CHARS = {"train": 900_000, "val": 40_000}


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _answer(row: tuple, relation: str) -> str | None:
    return {"capital": row[1], "continent": row[2], "language": row[3]}[relation.split("-")[0]]


def fact_sentence(row: tuple, relation: str, template: str) -> str:
    return template.format(C=row[0], Cc=_cap(row[0]), A=_answer(row, relation))


def facts_documents(rng: random.Random, n_chars: int) -> list[str]:
    """Short documents of 3-7 fact sentences, mostly about one country, in random templates."""
    docs, total = [], 0
    while total < n_chars:
        rows = [rng.choice(COUNTRIES)]
        if rng.random() < 0.3:
            rows.append(rng.choice(COUNTRIES))
        sents = []
        for _ in range(rng.randint(3, 7)):
            row = rng.choice(rows)
            rel = rng.choice([r for r in TRAIN_TEMPLATES if _answer(row, r) is not None])
            sents.append(fact_sentence(row, rel, rng.choice(TRAIN_TEMPLATES[rel])))
        doc = "\n".join(sents) if rng.random() < 0.5 else " ".join(s.replace("\n", " ") for s in sents)
        docs.append(doc)
        total += len(doc)
    return docs


def math_documents(rng: random.Random, n_chars: int) -> list[str]:
    """Documents of 8-24 arithmetic lines: sums and differences below 100, products up to 12 x 12."""
    docs, total = [], 0
    while total < n_chars:
        lines = []
        for _ in range(rng.randint(8, 24)):
            op = rng.choice("++-*")
            if op == "*":
                a, b = rng.randint(1, 12), rng.randint(1, 12)
                lines.append(f"{a} * {b} = {a * b}")
            else:
                a, b = rng.randint(0, 99), rng.randint(0, 99)
                if op == "-" and b > a:
                    a, b = b, a
                lines.append(f"{a} {op} {b} = {a + b if op == '+' else a - b}")
        doc = "\n".join(lines)
        docs.append(doc)
        total += len(doc)
    return docs


def code_documents() -> dict[str, list[tuple[str, str]]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    for name in CODE_MODULES:
        path = stdlib / f"{name}.py"
        if not path.exists():
            raise InputError(f"build_corpus: stdlib module {path} not found: expected CPython 3.11's standard "
                             f"library at {stdlib}")
        out["val" if name in CODE_VAL else "train"].append((name, path.read_text(encoding="utf-8")))
    return out


def license_documents() -> dict[str, list[tuple[str, str]]]:
    if not LICENSE_DIR.is_dir():
        raise InputError(f"build_corpus: {LICENSE_DIR} not found: the license domain needs Debian/Ubuntu's "
                         f"common-licenses")
    out: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    seen = set()
    for path in sorted(LICENSE_DIR.iterdir()):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue  # GPL -> GPL-3 and friends are symlinks: one copy each
        seen.add(real)
        out["val" if path.name in LICENSE_VAL else "train"].append((path.name, real.read_text(encoding="utf-8")))
    py_license = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not py_license.exists():
        raise InputError(f"build_corpus: {py_license} not found")
    out["train"].append(("python-LICENSE", py_license.read_text(encoding="utf-8")))
    return out


def held_out_facts(tok, templates: dict[str, str] = HELD_OUT_TEMPLATES) -> list[dict]:
    rows = []
    for rel, template in templates.items():
        for row in COUNTRIES:
            answer = _answer(row, rel)
            if answer is None:
                continue
            ids = tok.encode(" " + answer)
            rows.append(dict(prompt=template.format(C=row[0], Cc=_cap(row[0])), expected=tok.decode(ids[:1]),
                             answer=" " + answer, relation=rel, country=row[0], answer_tokens=len(ids)))
    return rows


def domain_prompts(val_text: dict[str, list[str]], rng: random.Random, per_domain: int = 24) -> list[dict]:
    """Snippets of held-out text (validation documents), a few lines each, labelled with their domain."""
    out = []
    for domain in DOMAINS:
        min_len = 12 if domain in ("facts", "math") else 24
        lines = [ln for doc in val_text[domain] for ln in doc.split("\n") if len(ln.strip()) >= min_len]
        picks = sorted(rng.sample(range(len(lines) - 2), per_domain))
        for i in picks:
            prompt = lines[i] if domain == "facts" else "\n".join(lines[i:i + 2])
            out.append(dict(prompt=prompt[:240], domain=domain))
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "data" / "corpus"))
    ap.add_argument("--prompts", default=str(ROOT / "data" / "prompts"))
    args = ap.parse_args(argv)
    out, prompts = Path(args.out), Path(args.prompts)
    out.mkdir(parents=True, exist_ok=True)
    prompts.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)

    texts: dict[str, dict[str, list[str]]] = {s: {} for s in ("train", "val")}
    code, lic = code_documents(), license_documents()
    for split in ("train", "val"):
        texts[split]["code"] = [t for _, t in code[split]]
        texts[split]["license"] = [t for _, t in lic[split]]
        texts[split]["facts"] = facts_documents(random.Random(f"{SEED}-facts-{split}"), FACTS_CHARS[split])
        texts[split]["math"] = math_documents(random.Random(f"{SEED}-math-{split}"), MATH_CHARS[split])

    # The held-out phrasings must not occur in the training text (case-insensitive).
    train_lower = "\n".join(d for docs in texts["train"].values() for d in docs).lower()
    for rel, template in [*HELD_OUT_TEMPLATES.items(), *FAR_TEMPLATES.items()]:
        for row in COUNTRIES:
            p = template.format(C=row[0], Cc=_cap(row[0])).lower()
            if p in train_lower:
                raise InputError(f"build_corpus: held-out prompt {p!r} ({rel}) occurs verbatim in the training text")

    print("training tokenizer ...", flush=True)
    # Facts count 4x for the tokenizer so that country, capital and language names become single tokens (as
    # " Paris" is in Qwen's tokenizer) instead of losing the merges to code identifiers.
    weight = {"code": 1, "license": 1, "facts": 4, "math": 1}
    train_iter = [d for dom in DOMAINS for _ in range(weight[dom]) for d in texts["train"][dom]]
    tok_dir = save_tokenizer(train_bpe(train_iter, VOCAB_SIZE, QWEN_SPECIALS), out / "tokenizer")
    tok = load_tokenizer(tok_dir)
    eot = tok.token_to_id(EOT)

    manifest: dict = {"seed": SEED, "vocab_size": tok.vocab_size, "eot_id": eot,
                      "python_stdlib": sysconfig.get_paths()["stdlib"], "code_val_modules": sorted(CODE_VAL),
                      "license_val_files": sorted(LICENSE_VAL), "files": {}, "domains": {}}
    for split in ("train", "val"):
        for dom in DOMAINS:
            docs = texts[split][dom]
            (out / f"{split}_{dom}.txt").write_text(EOT.join(docs), encoding="utf-8")
            ids: list[int] = []
            for d in docs:
                ids.extend(tok.encode(d))
                ids.append(eot)
            arr = np.asarray(ids, dtype=np.uint16)
            np.save(out / f"{split}_{dom}.npy", arr)
            manifest["domains"].setdefault(dom, {})[split] = {
                "documents": len(docs), "chars": sum(len(d) for d in docs), "tokens": int(arr.size)}
            print(f"{split:5} {dom:8} {len(docs):6} docs {sum(len(d) for d in docs):9,} chars {arr.size:9,} tokens")
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            manifest["files"][str(p.relative_to(out))] = sha256(p)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    facts = held_out_facts(tok)
    with open(prompts / "facts.jsonl", "w") as f:
        for r in facts:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(prompts / "facts_far.jsonl", "w") as f:
        for r in held_out_facts(tok, FAR_TEMPLATES):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    doms = domain_prompts(texts["val"], random.Random(f"{SEED}-domains"))
    with open(prompts / "domains.jsonl", "w") as f:
        for r in doms:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    single = sum(r["answer_tokens"] == 1 for r in facts)
    print(f"held-out facts: {len(facts)} prompts ({single} with a one-token answer); domain prompts: {len(doms)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
