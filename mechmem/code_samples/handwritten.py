"""Hand-written snippets for the is_code labelled set: languages and genres the disk lacks.

Written for this project (not copied): LaTeX, SQL, shell, config formats, Java, Ruby, R,
assembly on the code side; English prose of the genres the Pile holds (encyclopedic,
news, fiction, forum, abstracts, legal, LaTeX article bodies, markdown) on the other.
Several start or end mid-line, as 64-token windows of the Pile do.
"""

CODE = {
    "latex": [
        r"""\documentclass[11pt,a4paper]{article}
\usepackage[utf8]{inputenc}
\usepackage{amsmath,amssymb}
\usepackage{graphicx}
\usepackage[margin=2.5cm]{geometry}
\usepackage{hyperref}
\newcommand{\R}{\mathbb{R}}
\title{Notes on Convex Sets}""",
        r"""\begin{equation}
  \mathcal{L}(\theta) = -\frac{1}{N}\sum_{i=1}^{N} \log p_\theta(y_i \mid x_i)
  + \lambda \|\theta\|_2^2
\label{eq:loss}
\end{equation}
\begin{align*}
  f(x) &= \int_0^x g(t)\,dt \\
  f'(x) &= g(x)
\end{align*}""",
        r"""\begin{table}[ht]
\centering
\begin{tabular}{lcc}
\toprule
Model & Accuracy & F1 \\
\midrule
Baseline & 71.2 & 68.9 \\
Ours & \textbf{78.4} & \textbf{76.1} \\
\bottomrule
\end{tabular}
\caption{Results on the test set.}
\label{tab:results}
\end{table}""",
        r"""ntlemma}{Lemma}[section]
\newtheorem{theorem}[lemma]{Theorem}
\theoremstyle{definition}
\newtheorem{definition}[lemma]{Definition}
\DeclareMathOperator*{\argmax}{arg\,max}
\DeclareMathOperator{\tr}{tr}
\renewcommand{\vec}[1]{\boldsymbol{#1}}
\newcommand{\norm}[1]{\left\lVert#1\right\rVert}""",
        r"""\begin{figure}[t]
  \centering
  \includegraphics[width=0.48\linewidth]{figs/loss_curve.pdf}
  \hfill
  \includegraphics[width=0.48\linewidth]{figs/accuracy.pdf}
  \caption{Training loss (left) and accuracy (right).}
  \label{fig:curves}
\end{figure}""",
        r"""\usepackage{tikz}
\usetikzlibrary{arrows.meta,positioning}
\begin{tikzpicture}[node distance=2cm, every node/.style={draw, rounded corners}]
  \node (a) {Input};
  \node[right=of a] (b) {Encoder};
  \node[right=of b] (c) {Decoder};
  \draw[-Stealth] (a) -- (b);
  \draw[-Stealth] (b) -- (c);
\end{tikzpicture}""",
        r"""\begin{itemize}
  \item[(i)] $\forall x \in X,\ f(x) \geq 0$;
  \item[(ii)] $f(\lambda x) = |\lambda| f(x)$;
  \item[(iii)] $f(x+y) \leq f(x) + f(y)$.
\end{itemize}
\begin{proof}
Let $\epsilon > 0$. By \eqref{eq:bound} we have $\|x_n - x\| < \epsilon$ for all $n \geq N$. \qedhere
\end{proof}""",
        r"""@article{vaswani2017attention,
  title={Attention is all you need},
  author={Vaswani, Ashish and Shazeer, Noam and Parmar, Niki},
  journal={Advances in neural information processing systems},
  volume={30},
  year={2017}
}
@inproceedings{devlin2019bert,
  title={{BERT}: Pre-training of deep bidirectional transformers},""",
        r"""\setlength{\parindent}{0pt}
\setlength{\parskip}{6pt}
\pagestyle{fancy}
\fancyhf{}
\rhead{\thepage}
\lhead{\leftmark}
\bibliographystyle{plainnat}
\bibliography{references}
\end{document}""",
        r"""\[
\begin{pmatrix} a_{11} & a_{12} \\ a_{21} & a_{22} \end{pmatrix}
\begin{pmatrix} x_1 \\ x_2 \end{pmatrix}
=
\begin{pmatrix} b_1 \\ b_2 \end{pmatrix}
\]
\begin{cases}
  1 & \text{if } x > 0, \\
  0 & \text{otherwise.}
\end{cases}""",
        r"""\usepackage{algorithm}
\usepackage{algpseudocode}
\begin{algorithm}
\caption{Gradient descent}
\begin{algorithmic}[1]
\State $x_0 \gets$ initial point
\For{$k = 0, 1, \dots, K-1$}
  \State $x_{k+1} \gets x_k - \eta \nabla f(x_k)$
\EndFor
\State \Return $x_K$""",
        r"""}
\def\@maketitle{%
  \newpage
  \null
  \vskip 2em%
  \begin{center}%
  {\LARGE \@title \par}%
  \vskip 1.5em%
  {\large \lineskip .5em%
    \begin{tabular}[t]{c}%
      \@author
    \end{tabular}\par}%""",
    ],
    "sql": [
        """SELECT c.customer_id, c.name, COUNT(o.order_id) AS n_orders,
       SUM(o.total) AS revenue
FROM customers c
LEFT JOIN orders o ON o.customer_id = c.customer_id
WHERE o.created_at >= DATE '2023-01-01'
GROUP BY c.customer_id, c.name
HAVING COUNT(o.order_id) > 5
ORDER BY revenue DESC
LIMIT 20;""",
        """CREATE TABLE IF NOT EXISTS users (
    id SERIAL PRIMARY KEY,
    email VARCHAR(255) NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    is_admin BOOLEAN DEFAULT FALSE
);
CREATE INDEX idx_users_email ON users (email);""",
        """INSERT INTO `products` (`id`, `name`, `price`, `stock`) VALUES
(1, 'Widget', 9.99, 120),
(2, 'Gadget', 24.50, 35),
(3, 'Doohickey', 4.75, 0),
(4, 'Thingamajig', 13.00, 64);
UPDATE products SET stock = stock - 1 WHERE id = 2;""",
        """WITH ranked AS (
  SELECT employee_id, department_id, salary,
         ROW_NUMBER() OVER (PARTITION BY department_id ORDER BY salary DESC) AS rn
  FROM employees
)
SELECT department_id, employee_id, salary
FROM ranked
WHERE rn <= 3;""",
        """BEGIN TRANSACTION;
ALTER TABLE accounts ADD COLUMN balance NUMERIC(12, 2) DEFAULT 0;
UPDATE accounts SET balance = balance - 100 WHERE account_id = 17;
UPDATE accounts SET balance = balance + 100 WHERE account_id = 42;
COMMIT;
DROP VIEW IF EXISTS v_active_accounts;""",
    ],
    "shell": [
        """#!/usr/bin/env bash
set -euo pipefail

for f in "$@"; do
  if [[ ! -f "$f" ]]; then
    echo "missing: $f" >&2
    exit 1
  fi
  wc -l "$f"
done""",
        """export PATH="$HOME/.local/bin:$PATH"
alias ll='ls -alF'
alias gs='git status'
if [ -f ~/.bash_aliases ]; then
    . ~/.bash_aliases
fi
PS1='\\u@\\h:\\w\\$ '""",
        """$ git clone https://github.com/example/project.git
$ cd project
$ python -m venv .venv && source .venv/bin/activate
$ pip install -r requirements.txt
$ make test""",
        """  case "$1" in
    start)
      echo "Starting $NAME"
      start-stop-daemon --start --quiet --pidfile $PIDFILE --exec $DAEMON -- $DAEMON_OPTS
      ;;
    stop)
      start-stop-daemon --stop --quiet --pidfile $PIDFILE
      ;;
    *)
      echo "Usage: $0 {start|stop}" >&2""",
        """find . -name '*.log' -mtime +7 -print0 | xargs -0 rm -f
tar -czf backup-$(date +%Y%m%d).tar.gz /var/www
awk -F: '$3 >= 1000 {print $1}' /etc/passwd | sort | uniq -c
sed -i 's/foo/bar/g' config.ini""",
    ],
    "config": [
        """{
  "name": "my-app",
  "version": "1.2.0",
  "private": true,
  "scripts": {
    "build": "webpack --mode production",
    "test": "jest --coverage"
  },
  "dependencies": {
    "react": "^18.2.0",
    "react-dom": "^18.2.0"
  }
}""",
        """version: "3.8"
services:
  web:
    build: .
    ports:
      - "8000:8000"
    environment:
      - DATABASE_URL=postgres://user:pass@db:5432/app
    depends_on:
      - db
  db:
    image: postgres:15""",
        """CC = gcc
CFLAGS = -Wall -O2 -g
OBJS = main.o parser.o lexer.o

all: app

app: $(OBJS)
\t$(CC) $(CFLAGS) -o $@ $^

%.o: %.c
\t$(CC) $(CFLAGS) -c $< -o $@

clean:
\trm -f $(OBJS) app""",
        """FROM python:3.11-slim
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENV PYTHONUNBUFFERED=1
EXPOSE 8080
CMD ["gunicorn", "-b", "0.0.0.0:8080", "app:server"]""",
        """[server]
host = 0.0.0.0
port = 8080
workers = 4

[database]
url = sqlite:///data/app.db
pool_size = 10
echo = false

[logging]
level = INFO""",
        """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>com.example</groupId>
  <artifactId>demo</artifactId>
  <version>0.0.1-SNAPSHOT</version>
  <dependencies>
    <dependency>""",
        """name: CI
on: [push, pull_request]
jobs:
  test:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-python@v5
        with:
          python-version: "3.11"
      - run: pip install -e .[test]
      - run: pytest -q""",
    ],
    "java": [
        """public class Stack<T> {
    private final List<T> items = new ArrayList<>();

    public void push(T item) {
        items.add(item);
    }

    public T pop() {
        if (items.isEmpty()) {
            throw new IllegalStateException("empty stack");
        }
        return items.remove(items.size() - 1);""",
        """    @Override
    public boolean equals(Object o) {
        if (this == o) return true;
        if (o == null || getClass() != o.getClass()) return false;
        Point point = (Point) o;
        return x == point.x && y == point.y;
    }

    @Override
    public int hashCode() {
        return Objects.hash(x, y);""",
        """import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;

public static void main(String[] args) throws Exception {
    ExecutorService pool = Executors.newFixedThreadPool(4);
    for (int i = 0; i < 10; i++) {
        final int id = i;
        pool.submit(() -> System.out.println("task " + id));
    }
    pool.shutdown();""",
    ],
    "ruby": [
        """class User < ApplicationRecord
  has_many :posts, dependent: :destroy
  validates :email, presence: true, uniqueness: true

  def full_name
    "#{first_name} #{last_name}".strip
  end

  scope :active, -> { where(active: true) }
end""",
        """  def each_pair
    return enum_for(:each_pair) unless block_given?
    @hash.each do |key, value|
      yield key, value
    end
    self
  end

  def to_h
    @hash.dup
  end""",
    ],
    "r_matlab": [
        """library(ggplot2)
df <- read.csv("data/measurements.csv", stringsAsFactors = FALSE)
df$date <- as.Date(df$date)
fit <- lm(value ~ temperature + humidity, data = df)
summary(fit)
ggplot(df, aes(x = date, y = value, colour = site)) +
  geom_line() +
  theme_minimal()""",
        """function [x, iter] = newton(f, df, x0, tol)
% NEWTON  Solve f(x) = 0 by Newton's method.
x = x0;
for iter = 1:100
    dx = f(x) / df(x);
    x = x - dx;
    if abs(dx) < tol
        return
    end
end
warning('no convergence');""",
    ],
    "strings_and_comments": [
        """    if not os.path.exists(path):
        raise FileNotFoundError(
            f"The configuration file {path} does not exist. Please create it "
            "or pass the location of an existing file with --config."
        )
    # Older versions wrote the file without a header, so accept both.
    with open(path) as fh:""",
        """MESSAGES = {
    "welcome": "Welcome back! You have {n} new messages.",
    "goodbye": "Thanks for stopping by, see you soon.",
    "error": "Something went wrong while saving your changes.",
    "empty": "There is nothing here yet.",
}""",
        """// When the user scrolls past the header we pin the navigation bar to the
// top of the window, and we unpin it again when they scroll back up.
window.addEventListener('scroll', () => {
  const nav = document.querySelector('.nav');
  nav.classList.toggle('pinned', window.scrollY > 120);
});""",
        """echo "This script will install the development tools on your machine."
echo "It needs administrator rights and an internet connection."
read -p "Do you want to continue? [y/N] " answer
if [ "$answer" != "y" ]; then
  echo "Nothing was changed."
  exit 0
fi""",
        """/*
 * Returns the number of bytes that were written, or -1 if the buffer
 * is too small to hold the formatted value.
 */
static int format_value(char *buf, size_t len, double value)
{
    int n = snprintf(buf, len, "%.3f", value);
    return (n < 0 || (size_t)n >= len) ? -1 : n;
}""",
        """[
  {"id": 1, "title": "The Old Man and the Sea", "author": "Ernest Hemingway", "year": 1952},
  {"id": 2, "title": "Pride and Prejudice", "author": "Jane Austen", "year": 1813},
  {"id": 3, "title": "One Hundred Years of Solitude", "author": "Gabriel Garcia Marquez", "year": 1967}
]""",
        """-- Remove customers who have not placed an order in the last two years
-- and who never subscribed to the newsletter.
DELETE FROM customers
WHERE last_order_at < NOW() - INTERVAL '2 years'
  AND newsletter = FALSE;""",
        """    def test_rejects_negative_amounts(self):
        account = Account(balance=100)
        with self.assertRaises(ValueError):
            account.withdraw(-5)
        self.assertEqual(account.balance, 100)

    def test_withdraw_reduces_balance(self):""",
    ],
    "asm": [
        """_start:
    mov     rax, 1          ; sys_write
    mov     rdi, 1          ; stdout
    lea     rsi, [rel msg]
    mov     rdx, len
    syscall
    mov     rax, 60         ; sys_exit
    xor     rdi, rdi
    syscall
section .data
msg: db "Hello", 10""",
    ],
}

PROSE = {
    "encyclopedic": [
        """The river rises in the northern hills and flows southeast for about 240 kilometres before joining the main channel near the old market town. Its valley was settled in the Bronze Age, and several hill forts survive along the ridge that overlooks the upper course.""",
        """Photosynthesis is the process by which green plants and some other organisms use sunlight to synthesize foods from carbon dioxide and water. In plants it generally involves the green pigment chlorophyll and generates oxygen as a by-product.""",
        """He was born in 1843 in a small village near the coast, the third of seven children of a schoolteacher. After studying law at the university, he entered politics and was elected to parliament in 1874, where he served for nearly thirty years.""",
        """The cathedral was rebuilt after the fire of 1666 to a design that combined a classical dome with a long Gothic nave, a compromise demanded by the clergy. Construction took thirty-five years and was paid for largely by a tax on coal.""",
    ],
    "news": [
        """City officials said on Tuesday that the bridge would remain closed for at least three more weeks while engineers inspect damage caused by last month's flooding. Commuters have been advised to use the northern ring road, where additional bus services will run during peak hours.""",
        """Shares in the company fell 12 per cent in early trading after it cut its profit forecast for the year, blaming weaker demand in Europe and higher shipping costs. Analysts said the warning was larger than expected.""",
        """The team came from two goals down to win in the final minutes, with the substitute scoring twice in stoppage time. "I just tried to stay calm," he told reporters after the match. "The coach told us to keep playing our game.\"""",
    ],
    "fiction": [
        """She closed the door behind her and stood for a long moment in the dark hallway, listening to the rain. Somewhere upstairs a clock was ticking, slow and patient, as if it had been waiting for her all these years. She did not turn on the light.""",
        """"You're late," said the old man, without looking up from his cards. Tom hung his coat on the hook and sat down across from him. Neither of them spoke for a while. Outside, the wind pushed against the windows and the fire hissed and settled.""",
        """ing over the fields, the morning mist had begun to lift, and for the first time in weeks they could see the mountains. Anna took her brother's hand. "We'll be there by tonight," she said, though she did not believe it herself.""",
    ],
    "forum": [
        """I had the same problem last week. What fixed it for me was resetting the router to factory settings and then updating the firmware before restoring my old configuration. It took about twenty minutes but the connection has been stable since. Hope this helps!""",
        """Has anyone tried the new version yet? I'm thinking about upgrading but I've read mixed reviews about battery life. My current one is three years old and still works fine, so I don't want to spend the money unless it's really worth it.""",
        """Thanks for the detailed reply. I tried what you suggested, but the error still shows up when I open the file from the network drive. It works fine if I copy it to my desktop first, so I guess it has something to do with permissions.""",
    ],
    "abstract": [
        """Background: Chronic kidney disease is associated with increased cardiovascular risk. We conducted a randomized controlled trial to evaluate whether intensive blood pressure control reduces major cardiovascular events in patients with moderate disease. Methods: A total of 1,204 patients were enrolled""",
        """We study the problem of learning sparse representations from limited data. We show that under mild assumptions the proposed estimator is consistent and achieves the minimax rate. Experiments on three benchmark datasets demonstrate that our method outperforms existing approaches while requiring fewer samples.""",
        """ed that the expression of the gene was significantly reduced in knockout mice compared with wild-type controls (p < 0.01). These findings suggest that the protein plays a central role in the regulation of glucose metabolism in the liver.""",
    ],
    "legal": [
        """The tenant shall keep the premises in good repair and condition and shall not make any alterations without the prior written consent of the landlord, such consent not to be unreasonably withheld. Any notice under this agreement shall be in writing and delivered by hand or by registered post.""",
        """In the opinion of the court, the defendant's conduct did not amount to a breach of the duty of care owed to the claimant, since the risk was neither foreseeable nor one that a reasonable person in his position would have guarded against. The appeal is therefore dismissed.""",
    ],
    "latex_body": [
        r"""In this section we prove that the estimator is unbiased. Recall from Section~\ref{sec:model} that the observations are independent. Taking expectations on both sides of \eqref{eq:est} and using the linearity of expectation, we obtain the claim, as already noted by \citet{smith2019}.""",
        r"""Our approach differs from previous work in two respects. First, we do not assume that the noise is Gaussian; instead we only require a bounded second moment. Second, the number of samples $n$ may grow with the dimension $d$, which covers the high-dimensional regime studied in~\cite{lee2020, wang2021}.""",
    ],
    "markdown": [
        """## Installation

Install the package from PyPI with pip. The library supports Python 3.9 and newer, and it has no required dependencies apart from NumPy. If you want to run the examples, you will also need Matplotlib, which you can install with the `plots` extra.""",
        """If you find a bug, please open an issue on the tracker and describe what you expected to happen and what happened instead. Include the version you are using and, if you can, a short example that reproduces the problem. Pull requests are welcome too.""",
    ],
    "howto": [
        """Preheat the oven to 180 degrees. Butter a round cake tin and line the bottom with baking paper. Beat the butter and sugar together until pale and fluffy, then add the eggs one at a time, beating well after each. Fold in the flour and the lemon zest.""",
        """To replace the filter, first switch off the unit and unplug it from the wall. Open the front panel by pressing the two tabs on either side, slide out the old filter, and insert the new one with the arrow pointing towards the fan. Close the panel until it clicks.""",
    ],
    "numbers_and_lists": [
        """In 2019 the company's revenue rose by 4.5% to $3.2 billion, while operating costs fell to $2.1 billion. The board proposed a dividend of 45 cents per share, payable on 12 June to shareholders on the register on 28 May.""",
        """The kit contains:
a set of 12 coloured pencils,
two sketchbooks (A4 and A5),
a soft eraser and a sharpener,
and a short guide to drawing faces.
Delivery is free for orders over 30 euros.""",
        """See https://www.example.org/help for more details, or write to us at support@example.org. References: [1] Smith, J. (2004). The Theory of Games. Oxford University Press. [2] Brown, A. and Lee, K. (2011). Learning from Data, 2nd edition.""",
        """Results were similar in both groups (mean age 54.2 vs 53.8 years; 61% vs 58% women). After 12 months, 14 of 210 patients (6.7%) in the treatment group and 29 of 205 (14.1%) in the control group had been admitted to hospital.""",
    ],
    "other_languages": [
        """Le village se trouve au pied de la montagne, à une vingtaine de kilomètres de la ville. On y compte environ trois cents habitants, et l'église du douzième siècle attire chaque été de nombreux visiteurs venus de toute la région.""",
        """Die Stadt liegt am Ufer des Flusses und ist seit dem Mittelalter ein wichtiger Handelsplatz. Heute leben dort rund 80.000 Menschen, und die Altstadt mit ihren engen Gassen gehört zu den beliebtesten Zielen der Region.""",
        """La novela cuenta la historia de una familia que, a lo largo de tres generaciones, intenta mantener unida la casa heredada de sus abuelos. El autor combina la memoria personal con los grandes acontecimientos del siglo.""",
    ],
    "math_prose": [
        """Let f be a continuous function on the closed interval [a, b]. Then f attains a maximum and a minimum on [a, b], and for every value y between f(a) and f(b) there is a point c in the interval with f(c) = y.""",
        """Suppose that x and y are positive integers with x + y = 10. If x is twice y plus one, then x = 7 and y = 3, and the product xy equals 21. In general, for a fixed sum, the product is largest when the two numbers are equal.""",
    ],
    "verse": [
        """The fields are grey beneath the rain,
the road runs empty to the sea,
and all the summer's gold is gone
from every hedge and every tree.
But still the blackbird, late and low,
sings as if it did not know.""",
    ],
    "dialogue": [
        """Q: How long does delivery take?
A: Orders placed before noon are usually dispatched the same day and arrive within two to three working days. During holidays it may take a little longer.
Q: Can I return an item?
A: Yes, you can return any item within thirty days.""",
    ],
}
